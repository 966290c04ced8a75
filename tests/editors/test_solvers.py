"""Closed-form solves against their defining equations, on random float64 problems."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knowledger.editors.solvers import (CovSolver, SingularCovariance, emmet_delta, memit_delta,
                                        rome_delta)

F64 = torch.float64
FAST = settings(max_examples=20, deadline=None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def spd(d: int, g: torch.Generator, m: int | None = None) -> torch.Tensor:
    """A random SPD second moment (d, d) from m ≥ d samples, scaled like real MLP keys."""
    X = torch.randn(d, m or 4 * d, generator=g, dtype=F64)  # (d, m)
    return X @ X.T / X.shape[1] + 0.1 * torch.eye(d, dtype=F64)  # (d, d)


def problem(seed: int, d_in: int, d_out: int, n: int):
    g = torch.Generator().manual_seed(seed)
    C = spd(d_in, g)  # (d_in, d_in)
    W = torch.randn(d_out, d_in, generator=g, dtype=F64)  # (d_out, d_in)
    K = torch.randn(d_in, n, generator=g, dtype=F64)  # (d_in, n)
    V = torch.randn(d_out, n, generator=g, dtype=F64)  # (d_out, n)
    return C, W, K, V


dims = dict(seed=st.integers(0, 2**31 - 1), d_in=st.integers(3, 24), d_out=st.integers(1, 12))


# --- CovSolver -----------------------------------------------------------------------------------
@FAST
@given(**dims, m=st.integers(1, 4), lam=st.floats(1e-2, 1e4))
def test_cov_solve_matches_linalg_solve(seed, d_in, d_out, m, lam):
    g = torch.Generator().manual_seed(seed)
    C = spd(d_in, g)  # (d_in, d_in)
    X = torch.randn(d_in, m, generator=g, dtype=F64)  # (d_in, m)
    cov = CovSolver(C, lam, jitter=0.0)
    assert cov.retries == 0 and cov.jitter == 0.0
    assert rel(cov.solve(X), torch.linalg.solve(lam * C, X)) < 1e-10
    assert rel(cov.solve_c(X), torch.linalg.solve(C, X)) < 1e-10
    assert rel(cov.solve(X[:, 0]), torch.linalg.solve(lam * C, X[:, 0])) < 1e-10  # vector input
    true_cond = float(torch.linalg.cond(lam * C))
    assert 1.0 <= cov.condition_estimate <= true_cond * (1 + 1e-8)  # a lower bound


def test_cov_solver_does_not_touch_c_and_accepts_float32():
    g = torch.Generator().manual_seed(0)
    C = spd(8, g).float()  # (8, 8)
    before = C.clone()
    cov = CovSolver(C, 3.0)
    assert torch.equal(C, before)
    assert cov.factor.dtype == F64 and cov.solve(torch.ones(8)).dtype == F64


def test_cov_jitter_retry_on_zero_direction():
    C = torch.diag(torch.tensor([2.0, 1.0, 0.0, 3.0], dtype=F64))  # singular: one zero eigenvalue
    cov = CovSolver(C, 1.0, jitter=0.0)
    assert cov.retries >= 1 and cov.jitter > 0
    assert torch.isfinite(cov.solve(torch.ones(4, dtype=F64))).all()


def test_cov_jitter_grows_until_factorisable():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))  # (6, 6) orthogonal
    ev = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, -3e-7], dtype=F64)  # mean ≈ 2.5, slightly indefinite
    C = Q @ torch.diag(ev) @ Q.T  # (6, 6)
    cov = CovSolver(C, 1.0, jitter=1e-10, growth=100.0)
    # 1e-10 and 1e-8 (relative to mean diag 2.5) cannot cover −3e-7; 1e-6 can
    assert cov.retries == 2
    assert cov.jitter_rel == pytest.approx(1e-6)
    assert cov.info()["cov_retries"] == 2.0


def test_cov_gives_up_on_indefinite_and_rejects_bad_input():
    with pytest.raises(SingularCovariance):
        CovSolver(torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        CovSolver(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match="square"):
        CovSolver(torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError):
        CovSolver(torch.eye(2), 0.0)


# --- EMMET / ROME ----------------------------------------------------------------------------------
def emmet_dense(K, R, C, rho=0.0):
    CinvK = torch.linalg.solve(C, K)  # (d_in, n)
    G = K.T @ CinvK + rho * torch.eye(K.shape[1], dtype=F64)  # (n, n)
    return torch.linalg.solve(G, R.T).T @ CinvK.T  # (d_out, d_in)  R G⁻¹ KᵀC⁻¹ (G symmetric)


@FAST
@given(**dims, data=st.data())
def test_emmet_satisfies_constraint_exactly(seed, d_in, d_out, data):
    n = data.draw(st.integers(1, d_in - 1))
    C, W, K, V = problem(seed, d_in, d_out, n)
    cov = CovSolver(C, 5000.0, jitter=0.0)
    left, right, diag = emmet_delta(K, V - W @ K, cov, ridge=0.0, W=W, out_dtype=F64)
    assert left.shape == (d_out, n) and right.shape == (d_in, n)
    dW = left @ right.T  # (d_out, d_in)
    assert rel((W + dW) @ K, V) < 1e-8
    assert rel(dW, emmet_dense(K, V - W @ K, C)) < 1e-8  # factors == dense formula, λ divided out
    assert diag["ridge"] == 0.0 and diag["ridge_forced"] == 0.0
    assert diag["residual_after"] <= 1e-8 * diag["residual_before"]
    # optimality of min tr(ΔW C ΔWᵀ) s.t. ΔW K = R: the rows of ΔW C lie in the span of Kᵀ's rows
    M = (dW @ C).T  # (d_in, d_out)
    P = K @ torch.linalg.pinv(K)  # (d_in, d_in) projector onto col(K)
    assert rel(P @ M, M) < 1e-8


def test_emmet_ridge_matches_dense_and_is_scale_invariant():
    C, W, K, V = problem(3, 16, 6, 5)
    R = V - W @ K  # (6, 5)
    ridge = 1e-2
    left, right, diag = emmet_delta(K, R, CovSolver(C, 1.0, jitter=0.0), ridge, out_dtype=F64)
    G = K.T @ torch.linalg.solve(C, K)  # (5, 5)
    rho = ridge * float(G.diagonal().mean())
    assert diag["ridge"] == pytest.approx(rho)
    dW = left @ right.T  # (6, 16)
    assert rel(dW, emmet_dense(K, R, C, rho)) < 1e-10
    assert diag["residual_after"] > 0  # the ridge gives up a little of the constraint
    # neither λ nor the scale of C changes the update (ρ is relative to KᵀC⁻¹K)
    for lam, s in ((5000.0, 1.0), (1.0, 1e3)):
        l2, r2, _ = emmet_delta(K, R, CovSolver(s * C, lam, jitter=0.0), ridge, out_dtype=F64)
        assert rel(l2 @ r2.T, dW) < 1e-9


def test_emmet_nearly_dependent_keys_force_the_ridge():
    C, W, K, V = problem(4, 20, 8, 4)
    g = torch.Generator().manual_seed(5)
    K = torch.cat([K, K[:, :1] + 1e-9 * torch.randn(20, 1, generator=g, dtype=F64)], dim=1)  # (20, 5)
    V = torch.randn(8, 5, generator=g, dtype=F64)  # (8, 5) inconsistent targets for twin keys
    left, right, diag = emmet_delta(K, V - W @ K, CovSolver(C, 1.0), ridge=0.0)
    assert diag["gram_cond"] > 1e10
    assert diag["ridge_forced"] == 1.0 and diag["ridge"] > 0
    assert diag["cond"] < diag["gram_cond"]
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert all(math.isfinite(v) for v in diag.values())
    assert left.dtype == torch.float32 and right.dtype == torch.float32
    # a well-conditioned batch with ridge 0 is left alone
    _, _, ok = emmet_delta(K[:, :4], (V - W @ K)[:, :4], CovSolver(C, 1.0), ridge=0.0)
    assert ok["ridge_forced"] == 0.0 and ok["ridge"] == 0.0


def test_rome_is_rank_one_emmet():
    C, W, K, V = problem(6, 12, 7, 1)
    k, v = K[:, 0], V[:, 0]  # (12,), (7,)
    left, right, diag = rome_delta(k, v - W @ k, CovSolver(C, 10.0), out_dtype=F64)
    assert left.shape == (7, 1) and right.shape == (12, 1)
    Cinv_k = torch.linalg.solve(C, k)  # (12,)
    dense = torch.outer(v - W @ k, Cinv_k) / (k @ Cinv_k)  # (7, 12)
    assert rel(left @ right.T, dense) < 1e-8
    assert rel((W + left @ right.T) @ k, v) < 1e-8
    with pytest.raises(ValueError, match="one fact"):
        rome_delta(K.repeat(1, 2), (V - W @ K).repeat(1, 2), CovSolver(C, 1.0))


# --- MEMIT -----------------------------------------------------------------------------------------
def memit_dense(K, R, C, lam):
    A = lam * C + K @ K.T  # (d_in, d_in)
    return torch.linalg.solve(A, K @ R.T).T  # (d_out, d_in)  R Kᵀ A⁻¹ (A symmetric)


@FAST
@given(**dims, n=st.integers(1, 30), lam=st.floats(1e-3, 1e4))
def test_memit_zeroes_gradient_and_matches_direct_solve(seed, d_in, d_out, n, lam):
    C, W, K, V = problem(seed, d_in, d_out, n)  # n may exceed d_in: MEMIT is least squares
    R = V - W @ K  # (d_out, n)
    left, right, diag = memit_delta(K, R, CovSolver(C, lam, jitter=0.0), out_dtype=F64)
    assert left.shape == (d_out, n) and right.shape == (d_in, n)
    dW = left @ right.T  # (d_out, d_in)
    # ∇J = 2((W+ΔW)K − V)Kᵀ + 2λ ΔW C = 0
    grad = ((W + dW) @ K - V) @ K.T + lam * dW @ C  # (d_out, d_in)
    scale = float(torch.linalg.norm(R @ K.T)) + float(torch.linalg.norm(lam * dW @ C))
    assert float(torch.linalg.norm(grad)) <= 1e-9 * scale
    assert rel(dW, memit_dense(K, R, C, lam)) < 1e-8  # Woodbury == dense solve
    assert diag["residual_after"] <= diag["residual_before"] * (1 + 1e-12)
    assert diag["cond"] >= 1.0


def test_memit_diagnostics_from_factors():
    C, W, K, V = problem(7, 10, 6, 4)
    R = V - W @ K  # (6, 4)
    left, right, diag = memit_delta(K, R, CovSolver(C, 0.5), W=W, out_dtype=F64)
    dW = left @ right.T  # (6, 10)
    assert diag["delta_fro"] == pytest.approx(float(torch.linalg.norm(dW)), rel=1e-10)
    assert diag["residual_before"] == pytest.approx(float(torch.linalg.norm(V - W @ K)), rel=1e-12)
    assert diag["residual_after"] == pytest.approx(float(torch.linalg.norm(V - (W + dW) @ K)), rel=1e-9)
    assert diag["delta_rel_W"] == pytest.approx(diag["delta_fro"] / float(torch.linalg.norm(W)))
    assert {"cov_jitter", "cov_cond", "ridge", "cond", "n"} <= set(diag)
    assert all(isinstance(v, float) for v in diag.values())
    # float32 by default
    l32, r32, _ = memit_delta(K.float(), R.float(), CovSolver(C, 0.5))
    assert l32.dtype == r32.dtype == torch.float32


def test_solvers_reject_mismatched_or_non_finite_inputs():
    C, W, K, V = problem(8, 6, 3, 2)
    cov = CovSolver(C, 1.0)
    with pytest.raises(ValueError, match="d_in"):
        memit_delta(K[:5], V, cov)
    with pytest.raises(ValueError):
        emmet_delta(K, V[:, :1], cov)
    bad = V.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        emmet_delta(K, bad, cov)
    with pytest.raises(ValueError, match="ridge"):
        emmet_delta(K, V, cov, ridge=-1.0)


# --- ROME and PMET as published ----------------------------------------------------------------------
@FAST
@given(**dims, lam=st.floats(1e-2, 1e4))
def test_rome_is_the_papers_closed_form_without_ridge_or_lambda(seed, d_in, d_out, lam):
    """ROME (Meng et al. 2022, eq. 2 closed form): ΔW = (v − Wk)(C⁻¹k)ᵀ / (kᵀC⁻¹k), independent of λ."""
    C, W, K, V = problem(seed, d_in, d_out, 1)
    k, v = K[:, 0], V[:, 0]  # (d_in,), (d_out,)
    Cinv_k = torch.linalg.inv(C) @ k  # (d_in,) the paper's C⁻¹k, by an explicit inverse in float64
    paper = torch.outer(v - W @ k, Cinv_k) / (k @ Cinv_k)  # (d_out, d_in)
    left, right, diag = rome_delta(k, v - W @ k, CovSolver(C, lam, jitter=0.0), W=W, out_dtype=F64)
    assert rel(left @ right.T, paper) < 1e-8
    assert rel((W + left @ right.T) @ k, v) < 1e-8  # the constraint holds: no ridge
    assert diag["ridge"] == 0.0 and diag["residual_after"] <= 1e-8 * max(diag["residual_before"], 1.0)


@FAST
@given(**dims, n=st.integers(1, 8), n_layers=st.integers(1, 6), lam=st.floats(1e-2, 1e3))
def test_pmet_is_memits_least_squares_on_a_residual_spread_by_one_over_sqrt_layers_left(
        seed, d_in, d_out, n, n_layers, lam):
    """PMET (Li et al. 2024): at layer i of L, ΔW_i = (R_i / √(L − i)) Kᵀ (KKᵀ + λC)⁻¹."""
    from knowledger.editors.distribute import get_distribution
    from knowledger.editors.pmet import pmet_delta

    C, W, K, V = problem(seed, d_in, d_out, n)
    R = V - W @ K  # (d_out, n) the MLP-output residual still missing
    spread = get_distribution("sqrt")
    for i in range(n_layers):
        share = spread.share(i, n_layers)
        assert share == pytest.approx(1 / math.sqrt(n_layers - i))
        paper = (R / math.sqrt(n_layers - i)) @ K.T @ torch.linalg.inv(K @ K.T + lam * C)  # (d_out, d_in)
        left, right, _ = pmet_delta(K, R * share, CovSolver(C, lam, jitter=0.0), out_dtype=F64)
        assert rel(left @ right.T, paper) < 1e-7
