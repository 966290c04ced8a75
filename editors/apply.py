"""The only place that writes model weights: add or remove factored deltas, snapshot and restore.

Compute apart from apply (MEMIT's execute vs apply; peft's delta vs merge): editors return
LayerDeltas (ΔW = left @ rightᵀ in the math orientation W (d_out, d_in)); this module turns one
into the stored layout through the architecture table (`spec.from_math`: GPT-2's Conv1D stores
Wᵀ, nn.Linear stores W), adds it in float32 (float64 for float64 weights), checks that every new
weight is finite before writing any, and returns the sha256 of each new weight.

Precision: in float32, apply then remove returns the weights to within a few ulps of the
original, not bit for bit (W + Δ − Δ rounds twice; in bf16/fp16 the error is an ulp of that
format). For an exact rollback take `snapshot_params` before applying and `restore_params` after.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
from torch import nn

from .model_spec import ModelSpec
from .result import LayerDelta


class NonFiniteDelta(ValueError):
    """Applying a delta would write NaN or ±inf into a weight; nothing was written."""


def weight_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes: stored layout, row-major, native (little-endian) order."""
    t = t.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def dense_delta(spec: ModelSpec, delta: LayerDelta, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW = left @ rightᵀ in the stored weight's layout: (d_out, d_in) for linear, (d_in, d_out) for conv1d."""
    left = delta.left.to(device=device, dtype=dtype)  # (d_out, r)
    right = delta.right.to(device=device, dtype=dtype)  # (d_in, r)
    return spec.from_math(left @ right.T)  # stored layout


def _param(model: nn.Module, spec: ModelSpec, delta: LayerDelta) -> nn.Parameter:
    expected = spec.weight_name(delta.layer)
    if delta.param != expected:
        raise ValueError(f"delta for layer {delta.layer} names {delta.param!r}, but the "
                         f"{spec.family} table says {expected!r}")
    param = model.get_parameter(delta.param)
    if param.device.type == "meta":
        raise ValueError(f"{delta.param} is on the meta device (offloaded?); cannot edit it in place")
    stored_math_shape = tuple(spec.to_math(param).shape)  # (d_out, d_in)
    if delta.shape != stored_math_shape:
        raise ValueError(f"delta shape {delta.shape} (d_out, d_in) does not match {delta.param}'s "
                         f"{stored_math_shape} ({spec.orientation} orientation)")
    return param


def apply_deltas(model: nn.Module, spec: ModelSpec, deltas: Sequence[LayerDelta], *,
                 sign: float = 1.0) -> dict[str, str]:
    """Add sign · ΔW of every delta to its weight; return {param name: sha256 of the new weight}.

    All-or-nothing: every new weight (after the cast back to the parameter's dtype) is computed and
    checked finite before any is written; on a non-finite one NonFiniteDelta is raised and the
    model is untouched. Several deltas on the same parameter accumulate in the given order.
    """
    pending: dict[str, torch.Tensor] = {}  # name -> new weight in compute dtype, stored layout
    params: dict[str, nn.Parameter] = {}
    for delta in deltas:
        param = _param(model, spec, delta)
        name = delta.param
        dtype = _compute_dtype(param)
        base = pending[name] if name in pending else param.detach().to(dtype, copy=True)
        upd = dense_delta(spec, delta, dtype, param.device)  # stored layout
        if not bool(torch.isfinite(upd).all()):
            raise NonFiniteDelta(f"delta for {name} (layer {delta.layer}) has non-finite entries; "
                                 "no weight was written")
        pending[name] = base.add_(upd, alpha=float(sign))
        params[name] = param
    new_values: dict[str, torch.Tensor] = {}
    for name, value in pending.items():
        cast = value.to(params[name].dtype)  # stored layout, param dtype
        if not bool(torch.isfinite(cast).all()):
            raise NonFiniteDelta(f"{name} would become non-finite in {params[name].dtype} "
                                 "(overflow?); no weight was written")
        new_values[name] = cast
    with torch.no_grad():
        for name, value in new_values.items():
            params[name].copy_(value)
    return {name: weight_sha256(params[name]) for name in new_values}


def remove_deltas(model: nn.Module, spec: ModelSpec, deltas: Sequence[LayerDelta]) -> dict[str, str]:
    """Undo apply_deltas: subtract the deltas in reverse order. Exact only up to rounding (see top)."""
    return apply_deltas(model, spec, list(reversed(deltas)), sign=-1.0)


def snapshot_params(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached clones of the named parameters, for a bit-exact `restore_params`."""
    return {name: model.get_parameter(name).detach().clone() for name in names}


def restore_params(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write a snapshot back bit for bit; return {param name: sha256 of the restored weight}."""
    params = {name: model.get_parameter(name) for name in snapshot}
    for name, saved in snapshot.items():
        p = params[name]
        if saved.shape != p.shape or saved.dtype != p.dtype:
            raise ValueError(f"snapshot of {name} is {tuple(saved.shape)} {saved.dtype}, the "
                             f"parameter is {tuple(p.shape)} {p.dtype}")
    with torch.no_grad():
        for name, saved in snapshot.items():
            params[name].copy_(saved)
    return {name: weight_sha256(params[name]) for name in snapshot}
