"""PMET (Li et al., AAAI 2024, "PMET: Precise Model Editing in a Transformer"): what differs from MEMIT.

1. Target values (§"Optimizing TC hidden states", editors.values with optimise="pmet"): at the
   last edited layer L, two vectors are optimised together, δ_attn added to the attention output
   and δ_mlp added to the MLP output at the last subject token, with the same NLL + KL + weight
   decay objective for both (the paper weighs them alike). Only the MLP part becomes the target:
   z = m_L + δ_mlp, m_L the MLP output ("FFN hidden state") of layer L.
2. Residual (§"Updating FFN weights"): at edited layer l_i the residual is read at the MLP output
   of L, r_i = z − m_L(current weights), not at the layer's output as MEMIT does, and l_i gets
   1/√(L − i + 1) of it (editors.distribute.SqrtRemaining).
3. Solve: MEMIT's least squares on that residual (the paper's update of the FFN weights):
       ΔW = R Kᵀ (λC + K Kᵀ)⁻¹            K (d_in, n), R (d_out, n), C (d_in, d_in)
   so `pmet_delta` is `solvers.memit_delta`; it has its own name because the method's table entry
   (editors.methods) says which solve it runs, and a future change of PMET stays here.

Attention weights are never written: the paper finds MHSA holds extraction patterns, not facts.
"""
from __future__ import annotations

import torch

from .hooks import TraceDict
from .forward import run_from
from .model_spec import ModelSpec
from .solvers import CovSolver, memit_delta


def pmet_delta(K: torch.Tensor, R: torch.Tensor, cov: CovSolver, *, W: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PMET's update of one FFN output projection: ΔW = R Kᵀ (λC + KKᵀ)⁻¹ (MEMIT's closed form).

    K (d_in, n) keys; R (d_out, n) this layer's share of the MLP-output residual, already spread
    with 1/√(layers left) by the caller. Returns (left (d_out, n), right (d_in, n), diag).
    """
    left, right, diag = memit_delta(K, R, cov, W=W, out_dtype=out_dtype)
    diag.update(pmet=1.0)
    return left, right, diag


def run_with_component_deltas(model, spec: ModelSpec, L: int, h_in: torch.Tensor, onehot: torch.Tensor,
                              per_row: torch.Tensor, run: dict) -> torch.Tensor:
    """Run blocks L.. with δ_attn added to block L's attention output and δ_mlp to its MLP output.

    h_in  # (b, S, d) input of block L;  onehot  # (b, S, 1) 1 at the subject's last token
    per_row  # (b, 2, d): (δ_attn, δ_mlp) per row;  returns the final-normed states (b, S, d)
    """
    add_attn = onehot * per_row[:, 0].unsqueeze(1)  # (b, S, d)
    add_mlp = onehot * per_row[:, 1].unsqueeze(1)  # (b, S, d)

    def edit(output, name):
        return _add(output, add_attn if name == spec.attn_name(L) else add_mlp)

    with TraceDict(model, [spec.attn_name(L), spec.mlp_name(L)], retain_output=False, edit_output=edit):
        return run_from(model, spec, L, h_in, **run)


def _add(output, add):
    if isinstance(output, tuple):
        return (output[0] + add.to(output[0].dtype),) + tuple(output[1:])
    return output + add.to(output.dtype)
