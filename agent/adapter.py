"""The active deltas as a PEFT LoRA adapter (`knowledger export --adapter DIR`).

LoRA adds ΔW = scaling · B A to a projection, with B (d_out, r) and A (r, d_in) in the math
orientation (out = W x), whatever the layout the layer stores its weight in. knowledger's deltas
are factored the same way: ΔW = left @ rightᵀ with left (d_out, r) and right (d_in, r). So per
edited module (the parameter name without ".weight"), the adapter holds

    B = [left_1 | left_2 | …]   (d_out, R)      A = [right_1 | right_2 | …]ᵀ   (R, d_in)

over the module's active deltas in seq order, R = the sum of their ranks, lora_alpha = R so that
scaling = alpha / r = 1: B A = Σ left_i right_iᵀ, the live model's ΔW exactly (up to float32
rounding: the live weights are composed in float64, the adapter adds its product at run time).
Modules with different R get them through LoraConfig's rank_pattern / alpha_pattern.

When R exceeds min(d_out, d_in) (many operations on one layer), the module's summed delta is
factored again by an SVD in float64 and kept at rank min(d_out, d_in): no singular value is
dropped, so it is still exact, and the adapter is never larger than the dense delta.

GPT-2 stores its projections as transformers' Conv1D, weight (d_in, d_out); PEFT handles them with
`fan_in_fan_out=True` and the same A and B (ModelSpec.orientation says which families need it).

Written: adapter_config.json (peft.LoraConfig.save_pretrained), adapter_model.safetensors with
PEFT's key names (`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`), and whatever the
caller adds (the model card). Loads with `PeftModel.from_pretrained(base_model, DIR)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from knowledger.agent.live import ActiveDelta
from knowledger.ledger.errors import KnowledgerError

PEFT_MISSING = 'export --adapter needs peft: pip install "knowledger[peft]"'


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: its name, (d_out, d_in), the summed rank of its deltas and the rank
    written (smaller only when the SVD compression applied)."""

    module: str
    shape: tuple[int, int]
    total_rank: int
    rank: int


def lora_factors(deltas: list[ActiveDelta]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per module: (B (d_out, r), A (r, d_in), the summed rank before any compression), float32."""
    by_module: dict[str, list] = {}
    for a in sorted(deltas, key=lambda a: a.seq):
        name = a.delta.param
        if not name.endswith(".weight"):
            raise KnowledgerError(f"cannot export {name} as a LoRA adapter: LoRA adapts weights only")
        by_module.setdefault(name.removesuffix(".weight"), []).append(a.delta)
    out = {}
    for module, ds in sorted(by_module.items()):
        left = torch.cat([d.left.detach().to("cpu", torch.float64) for d in ds], 1)  # (d_out, R)
        right = torch.cat([d.right.detach().to("cpu", torch.float64) for d in ds], 1)  # (d_in, R)
        total = int(left.shape[1])
        cap = min(left.shape[0], right.shape[0])
        if total > cap:
            u, s, vh = torch.linalg.svd(left @ right.T, full_matrices=False)  # (d_out, k) (k,) (k, d_in)
            left, right = u[:, :cap] * s[:cap], vh[:cap].T  # (d_out, cap), (d_in, cap)
        out[module] = (left.float().contiguous(), right.T.float().contiguous(), total)  # B, A
    return out


def write_adapter(folder: Path, deltas: list[ActiveDelta], *, base_model: str, conv1d: bool
                  ) -> list[AdapterModule]:
    """Write adapter_config.json + adapter_model.safetensors into `folder` (an existing, empty
    directory the caller renames into place)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise KnowledgerError(PEFT_MISSING) from None
    factors = lora_factors(deltas)
    if not factors:
        raise KnowledgerError("no active edits: an adapter would be empty (export the model instead)")
    ranks = {m: int(b.shape[1]) for m, (b, _, _) in factors.items()}
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(factors), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=conv1d, task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                        inference_mode=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for module, (b, a, _) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a  # (r, d_in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b  # (d_out, r)
    (folder / "adapter_model.safetensors").write_bytes(st_save(tensors, metadata={"format": "pt"}))
    return [AdapterModule(m, (int(b.shape[0]), int(a.shape[1])), total, int(b.shape[1]))
            for m, (b, a, total) in factors.items()]
