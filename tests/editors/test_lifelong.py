"""AlphaEdit and ENCORE solves and the past-edit memory, in float64 against dense references."""
import pytest
import torch

from knowledger.editors.memory import KeyMemory
from knowledger.editors.solvers import (CovSolver, alphaedit_delta, encore_delta, memit_delta,
                                        null_space_basis)
from knowledger.editors.stats import null_space

D_IN, D_OUT = 24, 10


def spectrum_cov(seed=0, small=8):
    """C with `small` tiny eigenvalues (a real null space) and the rest O(1)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.full((small,), 1e-4, dtype=torch.float64),
                    torch.rand(D_IN - small, generator=g, dtype=torch.float64) + 0.5])
    return Q @ torch.diag(ev) @ Q.T, Q, ev


def test_null_space_basis_takes_the_smallest_directions_up_to_the_energy_threshold():
    C, Q, ev = spectrum_cov()
    U, info = null_space_basis(C, 1e-3)
    assert U.shape == (D_IN, 8) and info["null_dim"] == 8
    # the basis spans exactly the small-eigenvalue eigenvectors
    P = U @ U.T
    torch.testing.assert_close(P @ Q[:, :8], Q[:, :8])
    torch.testing.assert_close(P @ Q[:, 8:], torch.zeros(D_IN, D_IN - 8, dtype=torch.float64), atol=1e-10, rtol=0)
    assert info["null_energy"] < 1e-3
    U2, info2 = null_space_basis(C, 0.3, scale="max")
    assert info2["null_dim"] == int((ev < 0.3 * ev.max()).sum())
    with pytest.raises(ValueError, match="empty"):
        null_space_basis(torch.eye(4, dtype=torch.float64), 0.1)


def test_alphaedit_leaves_preserved_keys_unchanged_and_solves_the_projected_system():
    C, Q, _ = spectrum_cov()
    U, _ = null_space_basis(C, 1e-3)
    g = torch.Generator().manual_seed(1)
    K = torch.randn(D_IN, 3, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
    Kp = torch.randn(D_IN, 5, generator=g, dtype=torch.float64)
    M = Kp @ Kp.T
    alpha = 0.3
    left, right, diag = alphaedit_delta(K, R, U, alpha, memory=M, out_dtype=torch.float64)
    dW = left @ right.T  # (d_out, d_in)
    # 1) preserved subspace: any k0 in span of the large eigenvectors is untouched
    k0 = Q[:, 8:] @ torch.randn(D_IN - 8, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dW @ k0, torch.zeros(D_OUT, 4, dtype=torch.float64), atol=1e-10, rtol=0)
    # 2) the dense formula: ΔW = R Kᵀ P (M P + K Kᵀ P + α I)⁻¹
    P = U @ U.T
    dense = R @ K.T @ P @ torch.linalg.inv(M @ P + K @ K.T @ P + alpha * torch.eye(D_IN, dtype=torch.float64))
    torch.testing.assert_close(dW, dense, atol=1e-9, rtol=1e-7)
    assert diag["null_dim"] == 8


def test_alphaedit_with_keys_inside_the_null_space_and_tiny_alpha_meets_the_targets():
    C, Q, _ = spectrum_cov()
    U, _ = null_space_basis(C, 1e-3)
    g = torch.Generator().manual_seed(2)
    K = Q[:, :8] @ torch.randn(8, 3, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
    left, right, _ = alphaedit_delta(K, R, U, 1e-9, out_dtype=torch.float64)
    torch.testing.assert_close(left @ (right.T @ K), R, atol=1e-6, rtol=1e-6)


def test_encore_reduces_to_memit_without_memory_or_penalty_and_matches_its_formula():
    C, _, _ = spectrum_cov(small=0)
    g = torch.Generator().manual_seed(3)
    K = torch.randn(D_IN, 4, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, 4, generator=g, dtype=torch.float64)
    lam = 2.0
    l1, r1, _ = encore_delta(K, R, C, lam, 0.0, out_dtype=torch.float64)
    l2, r2, _ = memit_delta(K, R, CovSolver(C, lam, jitter=0.0), out_dtype=torch.float64)
    torch.testing.assert_close(l1 @ r1.T, l2 @ r2.T, atol=1e-10, rtol=1e-8)
    Kp = torch.randn(D_IN, 6, generator=g, dtype=torch.float64)
    M, alpha = Kp @ Kp.T, 0.7
    l3, r3, _ = encore_delta(K, R, C, lam, alpha, memory=M, out_dtype=torch.float64)
    dense = R @ K.T @ torch.linalg.inv(lam * C + alpha * torch.eye(D_IN, dtype=torch.float64) + M + K @ K.T)
    torch.testing.assert_close(l3 @ r3.T, dense, atol=1e-10, rtol=1e-8)
    # the norm penalty shrinks the update (same memory, α = 0 vs 0.7)
    l4, r4, _ = encore_delta(K, R, C, lam, 0.0, memory=M, out_dtype=torch.float64)
    assert torch.linalg.norm(l3 @ r3.T) < torch.linalg.norm(l4 @ r4.T)


def test_memory_preserves_past_edits_better_than_none():
    """With the past keys in the memory, a new ENCORE update moves W k_p less than without."""
    C, _, _ = spectrum_cov(small=0)
    g = torch.Generator().manual_seed(4)
    Kp = torch.randn(D_IN, 6, generator=g, dtype=torch.float64)
    K = Kp[:, :3] + 0.3 * torch.randn(D_IN, 3, generator=g, dtype=torch.float64)  # overlapping keys
    R = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
    lw, rw, _ = encore_delta(K, R, C, 0.1, 0.0, memory=Kp @ Kp.T, out_dtype=torch.float64)
    ln, rn, _ = encore_delta(K, R, C, 0.1, 0.0, out_dtype=torch.float64)
    assert torch.linalg.norm(lw @ (rw.T @ Kp)) < 0.8 * torch.linalg.norm(ln @ (rn.T @ Kp))


def test_key_memory_add_remove_add_equals_the_memory_of_the_surviving_keys():
    g = torch.Generator().manual_seed(5)
    A = {3: torch.randn(D_IN, 4, generator=g), 4: torch.randn(D_IN, 4, generator=g)}
    B = {3: torch.randn(D_IN, 2, generator=g), 4: torch.randn(D_IN, 2, generator=g)}
    Cb = {3: torch.randn(D_IN, 5, generator=g), 4: torch.randn(D_IN, 5, generator=g)}
    mem = KeyMemory.empty({3: D_IN, 4: D_IN})
    mem.add(A); mem.add(B); mem.remove(A); mem.add(Cb)
    ref = KeyMemory.from_keys({l: [B[l], Cb[l]] for l in (3, 4)})
    for l in (3, 4):
        torch.testing.assert_close(mem[l], ref[l], atol=1e-12, rtol=1e-12)
        assert mem.counts[l] == ref.counts[l] == 7
    with pytest.raises(ValueError, match="more keys"):
        mem.remove({3: torch.randn(D_IN, 8)})
    with pytest.raises(ValueError, match="d_in"):
        mem.add({3: torch.randn(D_IN + 1, 1)})


def test_null_space_is_cached_by_the_covariance_and_threshold(tmp_path):
    C, _, _ = spectrum_cov()
    U1, i1 = null_space(C, 1e-3, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    U2, i2 = null_space(C, 1e-3, cache_dir=tmp_path)
    torch.testing.assert_close(U1, U2)
    assert i1 == i2
    null_space(C, 2e-3, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
