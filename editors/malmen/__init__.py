"""MALMEN (Tan, Zhang & Fu, ICLR 2024): a meta-learned hyper-network turns each edit's gradient
into a value shift, and a ridge least squares aggregates the shifts into one update per layer.

For each edited linear layer ℓ (an MLP output projection, W_ℓ (d_out, d_in)) and each edit token j
(a position that predicts a token of target_new):
    u_j  (d_in,)   the layer's input, from one forward pass over prompt + target
    g_j  (d_out,)  ∂L_edit/∂v_j, the edit loss's gradient at the layer's output, one backward pass
The hyper-network maps [u_j; g_j] to (ũ_j, g̃_j) and the value shift is
    d_j = −lr_ℓ · (u_j · ũ_j) · g̃_j
and the update solves min_S Σ_j ‖Sᵀu_j − d_j‖² + e^{λ_ℓ}‖S‖²  (the normal equation):
    S_ℓ = (UᵀU + e^{λ_ℓ} I)⁻¹ UᵀD,   ΔW_ℓ = S_ℓᵀ          U (n, d_in), D (n, d_out)
UᵀU and UᵀD are sums over tokens, so the LM passes and the hyper-network both run in chunks: any
number of facts fits in memory. All layers' tokens come from one pass over the unedited model.

The hyper-network (HyperNet): per layer and feature running normalisation of [u; g], then
residual low-rank blocks x + B relu(A x), each followed by a per-layer scale and shift; the
blocks are shared by the layers (they have one shape), the normalisation, scale, shift, lr_ℓ
and λ_ℓ are per layer. lr and e^λ are learned in log space. B starts at zero, so an untrained
network is the identity on normalised inputs: d_j is then a normalised gradient step.

Meta-training lives in train.py (the agent drives it: knowledger.agent.malmen_train). A trained network
is a folder (`save_hypernet`): hypernet.safetensors + config.json, named by the sha256 of both.

    net, sha = load_hypernet("runs/malmen")
    editor = MalmenEditor(model, tokenizer, net, sha=sha)
    result = editor.compute(requests)        # EditResult; the model is left untouched
"""
from __future__ import annotations
from .artifact import CONFIG, WEIGHTS, artefact_sha256, load_hypernet, read_meta, save_hypernet
from .config import HyperConfig, check_compatible
from .editor import MalmenEditor
from .gradients import TokenCache, cache_requests, cache_tokens, edit_loss, final_hidden, rewrite_chunks
from .net import HyperNet, LowRankBlock, RunningNorm
from .solve import Normal, aggregate, factor

__all__ = ["CONFIG", "WEIGHTS", "HyperConfig", "HyperNet", "LowRankBlock", "MalmenEditor", "Normal",
           "RunningNorm", "TokenCache", "aggregate", "artefact_sha256", "cache_requests", "cache_tokens",
           "check_compatible", "edit_loss", "factor", "final_hidden", "load_hypernet", "read_meta",
           "rewrite_chunks", "save_hypernet"]
