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


# Knobs that were stored with past operations but never read by any editor: a recorded value equal
# to the old default is accepted (and dropped) so old ledgers replay; any other value is an error.
_RETIRED: dict[str, Any] = {"pmet_attn_weight": 1.0}  # the PMET paper weighs both parts alike


@dataclass(frozen=True)
class EditHParams:
    # --- where ------------------------------------------------------------------------------
    layers: tuple[int, ...]  # edited MLP output projections, ascending
    distribution: Literal["uniform", "last", "sqrt"] = "uniform"  # how the residual spreads (distribute.py)

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
    autocast_bf16: bool = False  # v* under bf16 autocast; presets: default_autocast_bf16(device)
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
        if self.distribution not in ("uniform", "last", "sqrt"):
            raise ValueError(f"unknown distribution {self.distribution!r} (uniform, last, sqrt)")

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
        d = {k: v for k, v in d.items() if not (k in _RETIRED and v == _RETIRED[k])}
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
        hp = load_preset(name)
    else:
        start = max(0, min(n - 1, n // 6))
        hp = EditHParams(layers=tuple(range(start, min(n, start + 5))))
    params = getattr(model, "parameters", None)
    device = next(params()).device if callable(params) else None
    if device is not None and "autocast_bf16" not in _preset_keys(name):
        hp = hp.replace(autocast_bf16=default_autocast_bf16(device))  # recorded: the ledger says which ran
    return hp


def _preset_keys(name: str) -> set[str]:
    path = resources.files(__package__).joinpath("presets", f"{name}.json")
    return set(json.loads(path.read_text())) if path.is_file() else set()


def default_autocast_bf16(device) -> bool:
    """Whether v* runs under bf16 autocast by default on `device`: on CUDA with bf16 support, and
    on CPUs with bf16 matrix units (Intel AMX: `amx_bf16` in /proc/cpuinfo, or torch reporting an
    AMX capability). Elsewhere (e.g. AVX2/AVX-512 without AMX) bf16 is emulated and no faster."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    if "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper():
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False
