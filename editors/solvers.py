"""Closed-form solves of the locate-then-edit editors: MEMIT, EMMET, ROME, AlphaEdit and ENCORE.

Pure tensor math, no model. Math orientation throughout: the edited projection is W (d_out, d_in)
with out = W @ k; keys K (d_in, n) hold one fact per column, target values V (d_out, n), the
residual R = V − W K (d_out, n), and C (d_in, d_in) is the keys' uncentred second moment over a
corpus (symmetric PSD). Every solve runs in float64; factors are returned as ΔW = left @ rightᵀ.

- MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer", eq. 14): minimise
  J(ΔW) = ‖(W+ΔW)K − V‖²_F + λ tr(ΔW C ΔWᵀ)  ⇒  ΔW = R Kᵀ (λC + K Kᵀ)⁻¹,
  computed with the Woodbury identity on a cached Cholesky factor of A = λC:
  (A + K Kᵀ)⁻¹ K = A⁻¹K (I + Kᵀ A⁻¹ K)⁻¹, an n×n solve per batch.
- EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing", equality-constrained form):
  minimise tr(ΔW C ΔWᵀ) s.t. (W+ΔW)K = V  ⇒  ΔW = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹.
- ROME (Meng et al. 2022, eq. 2): one key k on one layer, ΔW = (v − Wk)(C⁻¹k)ᵀ / (kᵀC⁻¹k) — the
  same constrained problem as EMMET with n = 1, solved in its own closed form without a ridge.
- PMET uses MEMIT's solve on its own residual (editors.pmet).

Solve, don't invert: C is factorised once per layer (`CovSolver`, kept by the caller across many
batches) and used through `torch.cholesky_solve`; no d×d inverse is ever formed.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

# n×n systems up to this size get an exact condition number (eigvalsh); beyond it the cheap
# Cholesky-diagonal lower bound, so a 10k-fact batch does not pay for a full eigendecomposition.
_EXACT_COND_MAX_N = 4096


class SingularCovariance(ValueError):
    """The key second moment could not be factorised, even with the largest allowed jitter."""


class CovSolver:
    """A float64 Cholesky factor of A = λC + εI for one layer, reused across batches.

    C (d_in, d_in) must be symmetric PSD; only its lower triangle is read (as LAPACK's potrf does).
    ε = jitter · mean(diag(λC)) is a tiny relative jitter that keeps a merely semi-definite C
    factorisable; if the factorisation still fails, ε is multiplied by `growth` and retried up to
    `max_jitter`. The ε finally used is kept in `jitter` / `jitter_rel` and `retries` counts the
    failed attempts (also logged as a warning), so the ledger can record it.
    """

    def __init__(self, C: torch.Tensor, lam: float = 1.0, *, jitter: float = 1e-10,
                 growth: float = 100.0, max_jitter: float = 1e-2):
        if C.ndim != 2 or C.shape[0] != C.shape[1]:
            raise ValueError(f"C must be square (d_in, d_in); got {tuple(C.shape)}")
        if not lam > 0:
            raise ValueError(f"λ must be > 0; got {lam}")
        if not (0 <= jitter <= max_jitter and growth > 1):
            raise ValueError("need 0 ≤ jitter ≤ max_jitter and growth > 1")
        A = C.to(torch.float64, copy=True)  # (d_in, d_in), the caller's C is never touched
        if not bool(torch.isfinite(A).all()):
            raise ValueError("C has non-finite entries")
        A.mul_(lam)
        scale = float(A.diagonal().mean()) if A.shape[0] else 1.0
        if not scale > 0:
            scale = 1.0  # C = 0 (or a degenerate diagonal): jitter relative to 1
        self.lam = float(lam)
        self.retries = 0
        rel, added = jitter, 0.0
        while True:
            eps = rel * scale
            A.diagonal().add_(eps - added)  # in place: no second d×d copy per attempt
            added = eps
            L, info = torch.linalg.cholesky_ex(A)  # (d_in, d_in) lower
            if int(info) == 0:
                break
            self.retries += 1
            rel = rel * growth if rel > 0 else 1e-12
            if rel > max_jitter * (1 + 1e-9):
                raise SingularCovariance(
                    f"Cholesky of λC + εI failed even with ε = {added:.3g} "
                    f"({added / scale:.3g} of mean diag); is C PSD and finite?")
        del A
        self.factor = L  # (d_in, d_in) lower-triangular, float64
        self.jitter = added  # absolute ε added to λC
        self.jitter_rel = added / scale  # ε relative to mean(diag(λC))
        if self.retries:
            log.warning("CovSolver: Cholesky needed jitter ε = %.3g (%.3g relative) after %d "
                        "retries; C is (nearly) singular", self.jitter, self.jitter_rel, self.retries)

    @property
    def d(self) -> int:
        return int(self.factor.shape[0])

    @property
    def condition_estimate(self) -> float:
        """(max Lᵢᵢ / min Lᵢᵢ)²: a cheap lower bound on the 2-norm condition number of A."""
        diag = self.factor.diagonal().abs()  # (d_in,)
        return float((diag.max() / diag.min()) ** 2) if self.d else 1.0

    def _as64(self, X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        vec = X.ndim == 1
        X = X.to(device=self.factor.device, dtype=torch.float64)
        X = X[:, None] if vec else X  # (d_in, m)
        if X.ndim != 2 or X.shape[0] != self.d:
            raise ValueError(f"expected (d_in={self.d}, m) or ({self.d},); got {tuple(X.shape)}")
        return X, vec

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """A⁻¹ X with A = λC + εI, in float64. X (d_in, m) or (d_in,)."""
        X, vec = self._as64(X)  # (d_in, m)
        Y = torch.cholesky_solve(X, self.factor)  # (d_in, m)
        return Y[:, 0] if vec else Y

    def solve_c(self, X: torch.Tensor) -> torch.Tensor:
        """C⁻¹ X with C regularised consistently as A/λ = C + (ε/λ)I, i.e. λ A⁻¹ X (float64)."""
        return self.solve(X) * self.lam  # (d_in, m) or (d_in,)

    def info(self) -> dict[str, float]:
        return {"cov_lambda": self.lam, "cov_jitter": self.jitter, "cov_jitter_rel": self.jitter_rel,
                "cov_retries": float(self.retries), "cov_cond": self.condition_estimate}


# --- helpers ---------------------------------------------------------------------------------------
def _check(K: torch.Tensor, R: torch.Tensor, cov: CovSolver) -> tuple[torch.Tensor, torch.Tensor]:
    if K.ndim != 2 or R.ndim != 2 or K.shape[1] != R.shape[1]:
        raise ValueError(f"need K (d_in, n) and R (d_out, n); got {tuple(K.shape)} and {tuple(R.shape)}")
    if K.shape[0] != cov.d:
        raise ValueError(f"K has d_in={K.shape[0]} but the covariance is {cov.d}×{cov.d}")
    if K.shape[1] == 0:
        raise ValueError("no keys (n = 0)")
    K64 = K.to(device=cov.factor.device, dtype=torch.float64)  # (d_in, n)
    R64 = R.to(device=cov.factor.device, dtype=torch.float64)  # (d_out, n)
    if not (bool(torch.isfinite(K64).all()) and bool(torch.isfinite(R64).all())):
        raise ValueError("keys or residuals have non-finite entries")
    return K64, R64


def _sym(S: torch.Tensor) -> torch.Tensor:
    return 0.5 * (S + S.mT)  # (n, n)


def _cond_sym(S: torch.Tensor) -> float:
    """2-norm condition number of a symmetric PSD n×n matrix (exact up to _EXACT_COND_MAX_N)."""
    if S.shape[0] <= _EXACT_COND_MAX_N:
        ev = torch.linalg.eigvalsh(S)  # (n,) ascending
        lo, hi = float(ev[0]), float(ev[-1])
        return math.inf if lo <= 0 else hi / lo
    L, info = torch.linalg.cholesky_ex(S)  # (n, n)
    if int(info):
        return math.inf
    d = L.diagonal().abs()  # (n,)
    return float((d.max() / d.min()) ** 2)


def _spd_solve(S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """S⁻¹ B for symmetric positive-definite S (n, n), B (n, m); LU fallback if Cholesky fails."""
    L, info = torch.linalg.cholesky_ex(S)  # (n, n)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)  # (n, m)
    return torch.linalg.solve(S, B)  # (n, m)


def _diagnostics(K: torch.Tensor, R: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 W: torch.Tensor | None) -> dict[str, float]:
    """Residual before/after and ‖ΔW‖_F, all from the factors (no dense d_out×d_in product)."""
    before = float(torch.linalg.norm(R))  # ‖V − W K‖ = ‖R‖
    after = float(torch.linalg.norm(R - left @ (right.T @ K)))  # ‖V − (W+ΔW) K‖; (d_out, n)
    fro2 = float(((left.T @ left) * (right.T @ right)).sum())  # tr((LᵀL)(RᵀR))
    out = {"n": float(K.shape[1]), "residual_before": before, "residual_after": after,
           "residual_ratio": after / before if before > 0 else 0.0,
           "delta_fro": math.sqrt(max(fro2, 0.0))}
    if W is not None:
        w = float(torch.linalg.norm(W.double()))
        out["delta_rel_W"] = out["delta_fro"] / w if w > 0 else math.inf
    return out


# --- the solves --------------------------------------------------------------------------------------
def memit_delta(K: torch.Tensor, R: torch.Tensor, cov: CovSolver, *, W: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """MEMIT's least-squares update ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ as left = R, right = (λC + KKᵀ)⁻¹K.

    K (d_in, n) keys; R (d_out, n) this layer's share of the residual (the caller spreads it,
    see `distribute`); cov holds λC. W (d_out, d_in, math orientation) is optional and only adds
    ‖ΔW‖/‖W‖ to the diagnostics. Returns (left (d_out, n), right (d_in, n), diag).
    """
    K, R = _check(K, R, cov)  # (d_in, n), (d_out, n)
    AinvK = cov.solve(K)  # (d_in, n)  A⁻¹K
    S = _sym(K.T @ AinvK)  # (n, n)  KᵀA⁻¹K
    S.diagonal().add_(1.0)  # (n, n)  I + KᵀA⁻¹K, SPD with eigenvalues ≥ 1
    right = _spd_solve(S, AinvK.T).T  # (d_in, n)  A⁻¹K (I + KᵀA⁻¹K)⁻¹ (S symmetric)
    left = R  # (d_out, n)
    diag = _diagnostics(K, R, left, right, W)
    diag.update(cond=_cond_sym(S), ridge=0.0, ridge_rel=0.0, ridge_forced=0.0, **cov.info())
    return left.to(out_dtype), right.to(out_dtype), diag


def emmet_delta(K: torch.Tensor, R: torch.Tensor, cov: CovSolver, ridge: float = 1e-2, *,
                W: torch.Tensor | None = None, max_cond: float = 1e10, fallback_ridge: float = 1e-6,
                out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """EMMET's equality-constrained update ΔW = R (KᵀC⁻¹K + ρI)⁻¹ KᵀC⁻¹.

    Factors: left = R (KᵀC⁻¹K + ρI)⁻¹ (d_out, n), right = C⁻¹K (d_in, n). C is `cov`'s C itself
    (λ divided back out, see CovSolver.solve_c), so the result does not depend on λ.

    ρ = ridge · mean(diag(KᵀC⁻¹K)) is relative, which keeps ΔW invariant to the scale of C. With
    ridge = 0 the constraint (W+ΔW)K = V holds exactly (up to rounding); ridge > 0 trades a little
    of it for stability when keys are nearly dependent (the preset's default is small). If the Gram
    matrix KᵀC⁻¹K has condition number above `max_cond`, ρ is raised to at least
    fallback_ridge · mean diag even when ridge = 0, and diag["ridge_forced"] = 1.0 says so.
    Returns (left, right, diag); diag["cond"] is the condition of the n×n system actually solved.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be ≥ 0; got {ridge}")
    K, R = _check(K, R, cov)  # (d_in, n), (d_out, n)
    CinvK = cov.solve_c(K)  # (d_in, n)  C⁻¹K
    G = _sym(K.T @ CinvK)  # (n, n)  KᵀC⁻¹K
    gram_cond = _cond_sym(G)
    mean_diag = float(G.diagonal().mean())
    rel, forced = ridge, False
    if gram_cond > max_cond and rel < fallback_ridge:
        rel, forced = fallback_ridge, True
        log.warning("EMMET: KᵀC⁻¹K has condition %.3g > %.3g (nearly dependent keys); "
                    "ridge raised to %.3g of its mean diagonal", gram_cond, max_cond, rel)
    rho = rel * mean_diag
    S = G.clone()  # (n, n)
    S.diagonal().add_(rho)  # (n, n)  KᵀC⁻¹K + ρI
    left = _spd_solve(S, R.T).T  # (d_out, n)  R (KᵀC⁻¹K + ρI)⁻¹ (S symmetric)
    right = CinvK  # (d_in, n)
    diag = _diagnostics(K, R, left, right, W)
    diag.update(cond=gram_cond if rho == 0 else _cond_sym(S), gram_cond=gram_cond, ridge=rho,
                ridge_rel=rel, ridge_forced=float(forced), **cov.info())
    return left.to(out_dtype), right.to(out_dtype), diag


def rome_delta(k: torch.Tensor, r: torch.Tensor, cov: CovSolver, *, W: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ROME's rank-one update (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
    eq. 2 and its closed form): minimise ‖ΔW‖ in the C-norm subject to (W + ΔW) k = v, which gives

        ΔW = (v − W k) (C⁻¹k)ᵀ / (kᵀ C⁻¹ k),   i.e.  left = r / (kᵀC⁻¹k) (d_out, 1),  right = C⁻¹k (d_in, 1).

    No ridge and no λ: C is `cov`'s C itself (CovSolver.solve_c divides λ back out; only its tiny
    jitter remains). k (d_in,) or (d_in, 1) is the key k*, r = v* − W k* (d_out,) or (d_out, 1).
    Returns (left, right, diag); (W + ΔW) k = v holds up to rounding.
    """
    K = k[:, None] if k.ndim == 1 else k  # (d_in, 1)
    R = r[:, None] if r.ndim == 1 else r  # (d_out, 1)
    if K.ndim != 2 or R.ndim != 2 or K.shape[1] != 1 or R.shape[1] != 1:
        raise ValueError(f"ROME edits one fact; got keys {tuple(K.shape)} and residuals {tuple(R.shape)}")
    K, R = _check(K, R, cov)  # (d_in, 1), (d_out, 1) float64
    u = cov.solve_c(K)  # (d_in, 1)  C⁻¹k
    denom = float((K.T @ u).squeeze())  # kᵀC⁻¹k, > 0 for C SPD and k ≠ 0
    if not denom > 0:
        raise ValueError(f"ROME: kᵀC⁻¹k = {denom:.3g} is not positive (zero key?)")
    left = R / denom  # (d_out, 1)
    right = u  # (d_in, 1)
    diag = _diagnostics(K, R, left, right, W)
    diag.update(cond=1.0, kCk=denom, ridge=0.0, ridge_rel=0.0, ridge_forced=0.0, **cov.info())
    return left.to(out_dtype), right.to(out_dtype), diag


# --- the lifelong solves: AlphaEdit and ENCORE ------------------------------------------------------
def null_space_basis(C: torch.Tensor, threshold: float = 2e-2, *,
                     scale: str = "energy") -> tuple[torch.Tensor, dict[str, float]]:
    """Û (d_in, r): orthonormal eigenvectors of C spanning its approximate null space (AlphaEdit).

    C = E[k kᵀ] of the preserved keys; its eigenvectors with the smallest eigenvalues are the
    directions those keys (almost) never use. Which count as "null" is scale-free:
    - scale="energy" (default): the smallest eigen-directions whose eigenvalues sum to at most
      `threshold` of tr(C), i.e. preserved keys keep ≥ 1 − threshold of their energy E‖k‖² outside
      the subspace an update may touch;
    - scale="max": eigenvalues below threshold · λ_max (AlphaEdit's absolute 2e-2 on its models'
      scale); on the default model this lets updates reach 26–58% of the keys' energy.
    Returns (Û float64, info with r and the energy fraction of the preserved keys inside span Û).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"null-space threshold must be in (0, 1); got {threshold}")
    ev, U = torch.linalg.eigh(C.to(torch.float64))  # ascending (d_in,), (d_in, d_in)
    ev = ev.clamp(min=0)
    total = float(ev.sum())
    if scale == "energy":
        keep = torch.cumsum(ev, 0) <= threshold * total  # (d_in,) a prefix of the ascending order
    elif scale == "max":
        keep = ev < threshold * ev[-1]
    else:
        raise ValueError(f"unknown null-space scale {scale!r} (energy, max)")
    basis = U[:, keep].contiguous()  # (d_in, r)
    r = int(keep.sum())
    if r == 0:
        raise ValueError(f"the null space of C is empty at threshold {threshold} ({scale}): raise it")
    return basis, {"null_dim": float(r), "null_energy": float(ev[keep].sum()) / total if total else 0.0,
                   "null_mean_energy": float(ev[keep].sum())}  # E‖Û Ûᵀ k‖² over the corpus


def alphaedit_delta(K: torch.Tensor, R: torch.Tensor, basis: torch.Tensor, alpha: float, *,
                    memory: torch.Tensor | None = None, W: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """AlphaEdit's projected update ΔW = R Kᵀ P (M P + K Kᵀ P + αI)⁻¹ with P = Û Ûᵀ.

    AlphaEdit (Fang et al., ICLR 2025, eq. 8/9): minimise ‖(W + ΔP)K − V‖² + ‖ΔP K_p‖² + α‖ΔP‖²
    over Δ, with K_p the past edits' keys (M = K_p K_pᵀ) and P the projector onto C's null space.
    The solution Y = ΔWᵀ of (P(M + KKᵀ) + αI) Y = P K Rᵀ lies in range(P) (α > 0), so with Y = Û y
    it reduces to the r×r SPD system (Ûᵀ(M + KKᵀ)Û + αI) y = ÛᵀK Rᵀ; hence
        left = R (d_out, n),  right = Û (Ûᵀ(M + KKᵀ)Û + αI)⁻¹ ÛᵀK (d_in, n),
    and ΔW k = 0 exactly for every k with Ûᵀk = 0 (the preserved subspace).
    """
    if not alpha > 0:
        raise ValueError(f"α must be > 0; got {alpha}")
    if K.ndim != 2 or R.ndim != 2 or K.shape[1] != R.shape[1] or K.shape[1] == 0:
        raise ValueError(f"need K (d_in, n) and R (d_out, n), n ≥ 1; got {tuple(K.shape)}, {tuple(R.shape)}")
    U = basis.to(torch.float64)  # (d_in, r)
    if K.shape[0] != U.shape[0]:
        raise ValueError(f"K has d_in={K.shape[0]} but the null-space basis has {U.shape[0]} rows")
    K64, R64 = K.to(U.device, torch.float64), R.to(U.device, torch.float64)  # (d_in, n), (d_out, n)
    UK = U.T @ K64  # (r, n)
    S = UK @ UK.T  # (r, r)  Ûᵀ K Kᵀ Û
    if memory is not None:
        S = S + U.T @ memory.to(U.device, torch.float64) @ U  # + Ûᵀ M Û
    S = _sym(S)
    S.diagonal().add_(alpha)
    right = U @ _spd_solve(S, UK)  # (d_in, n)
    left = R64  # (d_out, n)
    diag = _diagnostics(K64, R64, left, right, W)
    diag.update(null_dim=float(U.shape[1]), alpha=float(alpha), cond=_cond_sym(S),
                memory_keys=float(memory is not None))
    return left.to(out_dtype), right.to(out_dtype), diag


def encore_delta(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, alpha: float, *,
                 memory: torch.Tensor | None = None, W: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ENCORE's norm-constrained update ΔW = R Kᵀ (λC + αI + M + K Kᵀ)⁻¹.

    ENCORE (Gupta et al. 2025, "Lifelong Sequential Knowledge Editing without Model Degradation"):
    MEMIT's objective with the past edits' keys preserved (M = Σ K_p K_pᵀ) and a Frobenius-norm
    penalty α‖ΔW‖². The system changes with every batch (M grows), so it is factorised afresh:
    one float64 Cholesky of a d_in×d_in matrix per layer per batch.
    Returns (left = R (d_out, n), right = (λC + αI + M + KKᵀ)⁻¹K (d_in, n), diag).
    """
    if not (lam > 0 and alpha >= 0):
        raise ValueError(f"need λ > 0 and α ≥ 0; got {lam}, {alpha}")
    if K.ndim != 2 or R.ndim != 2 or K.shape[1] != R.shape[1] or K.shape[1] == 0:
        raise ValueError(f"need K (d_in, n) and R (d_out, n), n ≥ 1; got {tuple(K.shape)}, {tuple(R.shape)}")
    A = C.to(torch.float64) * lam  # (d_in, d_in)
    if K.shape[0] != A.shape[0]:
        raise ValueError(f"K has d_in={K.shape[0]} but C is {A.shape[0]}×{A.shape[0]}")
    K64, R64 = K.to(A.device, torch.float64), R.to(A.device, torch.float64)
    if memory is not None:
        A += memory.to(A.device, torch.float64)
    A.addmm_(K64, K64.T)
    A = _sym(A)
    A.diagonal().add_(alpha)
    right = _spd_solve(A, K64)  # (d_in, n)
    left = R64
    diag = _diagnostics(K64, R64, left, right, W)
    diag.update(alpha=float(alpha), cov_lambda=float(lam), memory_keys=float(memory is not None))
    return left.to(out_dtype), right.to(out_dtype), diag
