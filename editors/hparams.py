"""Typed hyperparameters for the locate-then-edit editors, with per-family presets.

Every knob lives here, validated in __post_init__ and loaded from presets/<name>.json. Values are
parsed by the field's type and checked against its range (RANGES, parse_value): a `--set` text, a
JSON value or a value read back from the ledger that does not fit is an HParamError (a ValueError)
naming the field and what it accepts; floats must be finite. Values are stored as JSON in the
ledger with each operation, so an edit can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal


# Knobs that were stored with past operations but never read by any editor: a recorded value equal
# to the old default is accepted (and dropped) so old ledgers replay; any other value is an error.
_RETIRED: dict[str, Any] = {"pmet_attn_weight": 1.0}  # the PMET paper weighs both parts alike


class HParamError(ValueError):
    """A hyperparameter of the wrong type or out of its range: one line naming the field and what
    it accepts (`--set v_steps=abc`, `v_lr=Infinity`, a negative `emmet_ridge`, ...)."""


_INT_MAX = 2**31 - 1
# field -> (kind, low, high, low_open, high_open); kind: "int", "float" (always finite), "bool",
# or a tuple of the accepted strings. Fields not listed (layers) are checked by parse_value itself.
RANGES: dict[str, tuple] = {
    "distribution": (("uniform", "last", "sqrt"),),
    "v_lr": ("float", 0, None, True), "v_steps": ("int", 1, _INT_MAX),
    "v_weight_decay": ("float", 0, None), "v_clamp_norm_factor": ("float", 0, None, True),
    "kl_factor": ("float", 0, None), "early_stop": ("bool",),
    "early_stop_patience": ("int", 1, _INT_MAX), "early_stop_loss": ("float", 0, None),
    "n_context": ("int", 0, 1000), "context_tokens": ("int", 1, 10_000),
    "context_seed": ("int", 0, 2**63 - 1), "autocast_bf16": ("bool",), "v_prefix_cache": ("bool",), "v_prefix_buckets": ("int", 1, 64), "v_buckets": ("int", 1, 64), "v_batch": ("int", 1, _INT_MAX),
    "mom2_weight": ("float", 0, None, True), "emmet_ridge": ("float", 0, None),
    "stats_tokens": ("int", 1, 10**12), "stats_dtype": (("float32", "float64"),),
    "alphaedit_null_threshold": ("float", 0, 1, True, True),
    "alphaedit_null_scale": (("energy", "max"),), "alphaedit_l2": ("float", 0, None, True),
    "encore_alpha": ("float", 0, None), "nas": ("bool",), "nas_anchor": ("float", 0, None),
    "nas_max_ratio": ("float", 0, None, True),
    "ultraedit_lr": ("float", 0, None), "ultraedit_ridge": ("float", 0, None),
    "ultraedit_normalise": ("bool",), "ultraedit_eps": ("float", 0, None, True),
    "malmen_lambda": (("trained", "tokens"),),
}
_INF_OK = {"early_stop_loss"}  # a threshold: +inf means "the goal is met at once"
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def accepted(name: str) -> str:
    """What a field accepts, in words: "a finite number > 0", "an integer in [1, 2147483647]"."""
    if name == "layers":
        return "a non-empty ascending list of distinct layer indices ≥ 0, e.g. [3,4,5]"
    if name == "ultraedit_layers":
        return "an ascending list of distinct layer indices ≥ 0, e.g. [18,19,20], or [] for the family's preset"
    kind, *bounds = RANGES[name]
    if isinstance(kind, tuple):
        return "one of " + ", ".join(kind)
    if kind == "bool":
        return "true or false"
    low, high, low_open, high_open = (bounds + [None, None, False, False][len(bounds):])
    if kind == "int":
        return f"an integer in [{low}, {high}]"
    if high is None:
        finite = "" if name in _INF_OK else "finite "
        return f"a {finite}number {'>' if low_open else '≥'} {low}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def parse_value(name: str, value: Any) -> Any:
    """`value` (a JSON value, or the text of `--set name=text`) as the field's type, checked
    against its range; HParamError otherwise."""
    def bad():
        return HParamError(f"hparams.{name} must be {accepted(name)}, got {value!r}")

    if name in ("layers", "ultraedit_layers"):
        items = value
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            items = [t.strip() for t in text.split(",") if t.strip()]
        if not isinstance(items, (list, tuple)) or (not items and name == "layers"):
            raise bad()
        out = tuple(_as_int(x, bad) for x in items)
        if list(out) != sorted(set(out)):
            raise HParamError(f"hparams.{name} must be ascending and unique: {out}")
        if out and min(out) < 0:
            raise HParamError(f"hparams.{name} must be non-negative: {out}")
        return out
    if name not in RANGES:
        return value
    kind, *bounds = RANGES[name]
    if isinstance(kind, tuple):
        if value not in kind:
            raise HParamError(f"unknown {name} {value!r} (accepted: {', '.join(kind)})")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    low, high, low_open, high_open = (bounds + [None, None, False, False][len(bounds):])
    if kind == "int":
        v = _as_int(value, bad)
    else:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                v = float(value)
            except ValueError:
                raise bad() from None
        elif isinstance(value, (int, float)):
            v = value
        else:
            raise bad()
        if not math.isfinite(v) and not (name in _INF_OK and v == math.inf):
            raise bad()
    if (v < low or (low_open and v == low)) or (high is not None and (v > high or (high_open and v == high))):
        raise bad()
    return v


def _as_int(value: Any, bad) -> int:
    if isinstance(value, bool):
        raise bad()
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    raise bad()


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
    v_prefix_cache: bool = True  # False: every v* step runs the whole model with logits everywhere,
    #                              as the reference implementation does (bench/speed.py's baseline)
    v_prefix_buckets: int = 1  # v*'s one-time prefix pass in up to this many groups of similar length
    v_buckets: int = 1  # facts grouped by the width each v* step recomputes (at most this many groups)

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

    # --- NAS norm anchors (editors.nas; arXiv 2602.02543) --------------------------------------
    nas: bool = False  # rescale every solved target v* to ‖v*‖ = nas_anchor; refuse > max_ratio×
    nas_anchor: float = 0.0  # ā, measured on the clean base model (editors.nas.measure_anchor);
    # 0 with nas on: "the workspace's anchor", which the agent measures once per base model and
    # fills in (agent.anchors) before an editor computes; the editor refuses to compute without one
    nas_max_ratio: float = 2.0  # a target with ‖v*‖ > nas_max_ratio · ā is refused (fact failed)

    # --- UltraEdit (editors.ultraedit; arXiv 2505.14679): its own modules, no v*, no key statistics --
    # 0 / [] take the value of the family's preset (editors.ultraedit.PRESETS); the ledger records
    # the values that ran (agent.recipes.recipe_of)
    ultraedit_layers: tuple[int, ...] = ()  # edited MLP output projections; []: the preset's
    ultraedit_lr: float = 0.0  # η, scale of the pseudo-values; 0: the preset's
    ultraedit_ridge: float = 0.0  # α of the ridge solve (raw key units); 0: the preset's
    ultraedit_normalise: bool = True  # lifelong normalisation (false: the ablation that collapses)
    ultraedit_eps: float = 1e-6  # floor of the running standard deviation

    # --- MALMEN (editors.malmen): the ridge e^λ_ℓ of its normal equation, per edited layer ------
    # "trained": e^λ_ℓ as meta-training learned it, at the batch it trained with; "tokens": scaled
    # by n / n_train, the normal equation's rows now over the mean rows it met in training, so that
    # the ridge keeps its weight against UᵀU (which grows with the batch); docs/malmen.md
    malmen_lambda: Literal["trained", "tokens"] = "trained"

    def __post_init__(self):
        for f in dataclasses.fields(self):  # parse by the field's type, check its range
            object.__setattr__(self, f.name, parse_value(f.name, getattr(self, f.name)))

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
        d["ultraedit_layers"] = list(self.ultraedit_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditHParams":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not (k in _RETIRED and v == _RETIRED[k])}
        unknown = set(d) - known
        if unknown:
            raise HParamError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
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
    AMX capability). Elsewhere it is off: on AVX2 bf16 is emulated, and on AVX512-BF16 without AMX
    v* measured no faster (docs/benchmarks.md, "An AVX512-BF16 host"), though its large products are."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper() or "amx_bf16" in cpu_flags()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: /proc/cpuinfo's first `flags` line (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())
