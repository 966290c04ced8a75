"""The only place that writes model weights: compose factored deltas in float64, write, restore.

Compute apart from apply (MEMIT's execute vs apply; peft's delta vs merge): editors return
LayerDeltas (ΔW = left @ rightᵀ in the math orientation W (d_out, d_in)). Two functions do the rest,
and every path (the editor's layer loop, `knowledger edit`, the benchmark, MALMEN training, the
ledger's live model) goes through them:

- `compose(base, deltas, spec)`: W_base + Σ ΔW in float64 in the stored layout (through the
  architecture table, `spec.from_math`: GPT-2's Conv1D stores Wᵀ, nn.Linear stores W), summed
  one rank-one outer product at a time — elementwise multiply and add only, no BLAS reduction whose
  order could depend on the thread count — so the result is a pure function of (base, deltas):
  `edit --out` and `apply` + `export` give the same bits.
- `write(model, values)`: the one `copy_`. Every value is checked (shape, finite after the cast
  to the parameter's dtype) before any is written; returns the sha256 of each new weight.

Precision: apply then remove (W + Δ − Δ) rounds twice and returns the weights to within an ulp of
the parameter's dtype, not bit for bit. For an exact rollback take `snapshot_params` before
applying and `restore_params` after.
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


def dense_delta(spec: ModelSpec, delta: LayerDelta, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW = left @ rightᵀ in the stored weight's layout: (d_out, d_in) for linear, (d_in, d_out) for
    conv1d. For reading and reporting only: weights are written through `compose`."""
    left = delta.left.to(device=device, dtype=dtype)  # (d_out, r)
    right = delta.right.to(device=device, dtype=dtype)  # (d_in, r)
    return spec.from_math(left @ right.T)  # stored layout


def compose(base: torch.Tensor, deltas: Sequence[LayerDelta], spec: ModelSpec, *,
            sign: float = 1.0) -> torch.Tensor:
    """base + sign · Σ ΔW in float64, stored layout, on base's device; base itself is not touched.

    base  # stored layout, any float dtype (a float64 base is copied, so a cached partial sum can
          # be continued: compose(compose(W, a), b) equals compose(W, a + b) bit for bit)
    Each ΔW = Σ_k left[:, k] right[:, k]ᵀ is added one outer product at a time, in the given order.
    """
    acc = base.detach().to(torch.float64, copy=True)  # stored layout
    for delta in deltas:
        left = delta.left.detach().to(device=acc.device, dtype=torch.float64)  # (d_out, r)
        right = delta.right.detach().to(device=acc.device, dtype=torch.float64)  # (d_in, r)
        if not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
            raise NonFiniteDelta(f"delta for {delta.param} (layer {delta.layer}) has non-finite entries; "
                                 "no weight was written")
        if sign != 1.0:
            left = left * sign  # (d_out, r)
        for k in range(left.shape[1]):
            acc.add_(spec.from_math(torch.outer(left[:, k], right[:, k])))  # stored layout
    return acc


def cast_checked(name: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` in the parameter's dtype, refused (NonFiniteDelta) if that is not finite."""
    cast = value.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        raise NonFiniteDelta(f"{name} would become non-finite in {dtype} (overflow?); no weight was written")
    return cast


def write(model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write {param name: value} into the model; return {param name: sha256 of the new weight}.

    The only `copy_` of the code base. All-or-nothing: every value is checked first (its shape
    equals the parameter's, stored layout; finite once cast to the parameter's dtype) and a
    ValueError / NonFiniteDelta is raised before anything is written.
    """
    params = {name: model.get_parameter(name) for name in values}
    ready: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        p = params[name]
        if p.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (offloaded?); cannot write it in place")
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"value for {name} is {tuple(value.shape)}, the parameter is {tuple(p.shape)}")
        ready[name] = cast_checked(name, value.detach(), p.dtype)
    with torch.no_grad():
        for name, value in ready.items():
            params[name].copy_(value)
    return {name: weight_sha256(params[name]) for name in ready}


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

    Per parameter: compose(current weight, its deltas in the given order) in float64, then one
    all-or-nothing `write` (on a non-finite result NonFiniteDelta is raised and nothing is written).
    """
    by_param: dict[str, list[LayerDelta]] = {}
    for delta in deltas:
        _param(model, spec, delta)  # name and shape agree with the architecture table
        by_param.setdefault(delta.param, []).append(delta)
    values = {name: compose(model.get_parameter(name), ds, spec, sign=sign) for name, ds in by_param.items()}
    return write(model, values)


def apply_from_base(model: nn.Module, spec: ModelSpec, base: dict[str, torch.Tensor],
                    deltas: Sequence[LayerDelta]) -> dict[str, str]:
    """Make each parameter in `base` (a snapshot) base + Σ of its deltas, composed from the base
    (not from the current weights): the rule the ledger's live model follows, so a model edited
    batch after batch this way has the bits `apply` + `export` give for the same deltas."""
    by_param: dict[str, list[LayerDelta]] = {name: [] for name in base}
    for delta in deltas:
        _param(model, spec, delta)
        by_param[delta.param].append(delta)
    return write(model, {name: compose(base[name], ds, spec) for name, ds in by_param.items()})


def remove_deltas(model: nn.Module, spec: ModelSpec, deltas: Sequence[LayerDelta]) -> dict[str, str]:
    """Undo apply_deltas: subtract the deltas in reverse order. Exact only up to rounding (see top)."""
    return apply_deltas(model, spec, list(reversed(deltas)), sign=-1.0)


def snapshot_params(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached clones of the named parameters, for a bit-exact `restore_params`."""
    return {name: model.get_parameter(name).detach().clone() for name in names}


def restore_params(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write a snapshot back bit for bit; return {param name: sha256 of the restored weight}."""
    for name, saved in snapshot.items():
        p = model.get_parameter(name)
        if saved.shape != p.shape or saved.dtype != p.dtype:
            raise ValueError(f"snapshot of {name} is {tuple(saved.shape)} {saved.dtype}, the "
                             f"parameter is {tuple(p.shape)} {p.dtype}")
    return write(model, snapshot)
