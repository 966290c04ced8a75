"""Typed hyperparameters for the locate-then-edit editors, with per-family presets.

Every knob lives here, validated in __post_init__ and loaded from presets/<name>.json. Values are
stored as JSON in the ledger with each operation, so an edit can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal


@dataclass(frozen=True)
class EditHParams:
    # --- where ------------------------------------------------------------------------------
    layers: tuple[int, ...]  # edited MLP output projections, ascending
    distribution: Literal["uniform", "last"] = "uniform"  # how the residual spreads over layers

    # --- target values v* (optimised at the last edited layer's output) --------------------
    v_lr: float = 0.5  # Adam learning rate on the residual-stream change δ
    v_steps: int = 25  # maximum optimisation steps
    v_weight_decay: float = 1e-3  # L2 on δ, relative to ‖h‖²
    v_clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖h‖ (h: the unedited hidden state)
    kl_factor: float = 0.0625  # weight of KL(essence prompts) that keeps "{subject} is a" stable
    early_stop: bool = True  # stop once target_new is top-1 on every prompt ...
    early_stop_patience: int = 1  # ... for this many consecutive steps
    early_stop_loss: float = 5e-2  # or once the mean NLL of the target falls below this
    n_context: int = 5  # model-generated context prefixes (plus the bare prompt)
    context_tokens: int = 10  # length of each generated prefix
    context_seed: int = 0  # prefixes are generated greedily-seeded and cached: reproducible
    autocast_bf16: bool = False  # run the v* optimisation under bf16 autocast (CPU AMX)
    v_batch: int = 16  # facts optimised together; larger batches run in chunks (bounded memory)

    # --- solve -------------------------------------------------------------------------------
    mom2_weight: float = 5000.0  # MEMIT's λ on the key second moment C (not scale-free!)
    emmet_ridge: float = 1e-2  # EMMET: ridge on KᵀC⁻¹K, relative to its mean diagonal
    stats_tokens: int = 100_000  # tokens of corpus text for C
    stats_dtype: Literal["float32", "float64"] = "float32"

    # --- lifelong editors (past-edit memory M = Σ K_p K_pᵀ; editors.memory) -------------------
    alphaedit_null_threshold: float = 2e-2  # AlphaEdit: how much of C's spectrum counts as null
    alphaedit_null_scale: Literal["energy", "max"] = "max"  # ... as a fraction of λ_max or of tr(C)
    alphaedit_l2: float = 0.1  # AlphaEdit's α, relative to E‖P k‖² of corpus keys (scale-free)
    encore_alpha: float = 0.1  # ENCORE's Frobenius-norm weight α, relative to mean diag(λC)

    # --- PMET ----------------------------------------------------------------------------------
    pmet_attn_weight: float = 1.0  # weight of the attention-output part of the optimised change

    # --- NAS norm anchors (editors.nas; arXiv 2602.02543) --------------------------------------
    nas: bool = False  # rescale every solved target v* to ‖v*‖ = nas_anchor; refuse > max_ratio×
    nas_anchor: float = 0.0  # ā, measured on the clean base model (editors.nas.measure_anchor)
    nas_max_ratio: float = 2.0  # a target with ‖v*‖ > nas_max_ratio · ā is refused (fact failed)

    def __post_init__(self):
        layers = tuple(int(x) for x in self.layers)
        if not layers:
            raise ValueError("hparams.layers is empty")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"hparams.layers must be ascending and unique: {layers}")
        if min(layers) < 0:
            raise ValueError(f"hparams.layers must be non-negative: {layers}")
        object.__setattr__(self, "layers", layers)
        for name in ("v_lr", "v_clamp_norm_factor", "mom2_weight", "alphaedit_l2"):
            if not getattr(self, name) > 0:
                raise ValueError(f"hparams.{name} must be > 0")
        for name in ("v_steps", "n_context", "stats_tokens", "early_stop_patience", "v_batch"):
            if getattr(self, name) < (0 if name == "n_context" else 1):
                raise ValueError(f"hparams.{name} is out of range: {getattr(self, name)}")
        if not 0 < self.alphaedit_null_threshold < 1:
            raise ValueError("hparams.alphaedit_null_threshold must be in (0, 1)")
        if self.alphaedit_null_scale not in ("energy", "max"):
            raise ValueError(f"unknown alphaedit_null_scale {self.alphaedit_null_scale!r} (energy, max)")
        if self.encore_alpha < 0:
            raise ValueError("hparams.encore_alpha must be ≥ 0")
        if self.nas and not self.nas_anchor > 0:
            raise ValueError("hparams.nas needs nas_anchor > 0 (measure it: editors.nas.measure_anchor)")
        if not self.nas_max_ratio > 0:
            raise ValueError("hparams.nas_max_ratio must be > 0")
        if self.distribution not in ("uniform", "last"):
            raise ValueError(f"unknown distribution {self.distribution!r} (uniform, last)")

    @property
    def v_layer(self) -> int:
        """The layer whose output the target value is optimised at: the last edited one."""
        return self.layers[-1]

    def replace(self, **changes: Any) -> "EditHParams":
        """A copy with `changes`; an unknown key is a ValueError naming it (not a TypeError)."""
        return EditHParams.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditHParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> EditHParams:
    path = resources.files(__package__).joinpath("presets", f"{name}.json")
    if not path.is_file():
        raise ValueError(f"no hyperparameter preset {name!r} (have: {', '.join(preset_names())})")
    data = json.loads(path.read_text())
    data.pop("_comment", None)
    return EditHParams.from_dict(data)


def preset_for(model) -> EditHParams:
    """The preset for a model: `<model_type>-<n_layers>L.json` if present, else a generic rule.

    The generic rule edits five consecutive layers starting at a sixth of the depth, the region
    causal tracing points at for most decoder-only models.
    """
    config = getattr(model, "config", model)
    n = int(config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer)
    name = f"{config.model_type}-{n}L"
    if name in preset_names():
        return load_preset(name)
    start = max(0, min(n - 1, n // 6))
    layers = tuple(range(start, min(n, start + 5)))
    return EditHParams(layers=layers)
