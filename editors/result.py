"""What an editor returns: factored weight deltas plus the keys and values it used.

Compute apart from apply (peft's delta vs merge): an editor never writes weights; it returns an
EditResult, and `knowledger.editors.apply` is the one place that adds or removes deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerDelta:
    """ΔW = left @ rightᵀ for one edited projection, in the math orientation W (d_out, d_in).

    Stored factored (rank r ≤ number of facts); dense only at the moment of applying.
    `orientation` says which layout the factors are in: always "math" (ΔW (d_out, d_in)); the
    stored layout of the weight comes from the architecture table (ModelSpec.from_math), never from
    a shape. `dtype` is the factors' dtype (float32 as editors return and the ledger stores them).
    """

    layer: int
    param: str  # parameter name in model.state_dict(), e.g. "model.layers.4.mlp.down_proj.weight"
    left: torch.Tensor  # (d_out, r)
    right: torch.Tensor  # (d_in, r)
    orientation: str = "math"

    def __post_init__(self):
        if self.orientation != "math":
            raise ValueError(f"LayerDelta factors are in the math orientation; got {self.orientation!r}")
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[1]:
            raise ValueError(
                f"LayerDelta factors must be (d_out, r) and (d_in, r); got "
                f"{tuple(self.left.shape)} and {tuple(self.right.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:  # (d_out, d_in)
        return int(self.left.shape[0]), int(self.right.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.left.to(dtype) @ self.right.to(dtype).T  # (d_out, d_in)

    def frobenius_norm(self) -> float:
        # ‖L Rᵀ‖_F² = tr((LᵀL)(RᵀR)), without forming the dense matrix
        l, r = self.left.double(), self.right.double()
        return float(torch.sqrt(torch.clamp(((l.T @ l) * (r.T @ r)).sum(), min=0.0)))


@dataclass
class EditResult:
    """Everything an edit produced; the agent records it in the ledger."""

    editor: str
    deltas: list[LayerDelta]
    # per edited layer: keys K (d_in, n) and target values V (d_out, n) the solve used, columns
    # in request order
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    diagnostics: dict = field(default_factory=dict)  # per layer: residual before/after, norms
    # per request: did v* reach its goal (target top-1 on every optimisation prompt), final loss
    value_stats: list[dict] = field(default_factory=list)
    # the residual target z (n, d) the solve asked of layer `target_layer` (L, the last edited one)
    # at each fact's subject (anchored when NAS is on); `target_site` "block" (the block's output)
    # or "mlp" (L's MLP output: PMET). None for editors without one (MALMEN, UltraEdit)
    targets: torch.Tensor | None = None
    target_layer: int | None = None
    target_site: str | None = None
