"""The table of editing methods: one frozen entry per method, read by everything that needs one.

Like peft's PEFT_TYPE_TO_CONFIG_MAPPING and its tuner classes (STYLE.md #13), each method declares
- `optimise`: what the target-value optimisation (editors.values) changes — "mlp": one vector
  added to the last edited layer's output (MEMIT §3.2, shared by ROME, EMMET, AlphaEdit, ENCORE);
  "pmet": one vector on the attention and one on the MLP output of that layer, and the residual is
  read at the MLP output (editors.pmet); "none": no v* at all (MALMEN's hyper-network);
- `solve`: the closed-form solve (editors.solvers), given a layer's keys K (d_in, n), its share of
  the residual R (d_out, n), the weight W (d_out, d_in) and the past-edit memory;
- `distribution`: the layer spreading it always uses (ROME "last", PMET "sqrt"; None: the
  hyperparameters' own, MEMIT's "uniform" by default; editors.distribute);
- `max_batch`: the most facts one compute() takes (ROME: 1);
- `reads_memory`: whether it reads Σ K_p K_pᵀ of the past edits (editors.memory);
- `value_stop`: when v* stops — "patience+loss" (target top-1 for `early_stop_patience` steps, or
  NLL < early_stop_loss) or "mpes" (ENCORE's most-probable early stopping: top-1 alone);
- `lifelong_stats`: whether it keeps never-reset normalisation statistics (editors.lifelong_norm)
  that the agent loads from the ledger before each batch and records with each operation
  (UltraEdit: per batch its moments, and the running state after it).

The editor (editors.editor), the scheduler, the CLI's choices and the benchmark all read this table;
a name it lacks is an error (`get_method`), never a fall-through to another method. Adding a method
is adding an entry here and its solve in a file of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Literal, Mapping

from .distribute import DISTRIBUTIONS

if TYPE_CHECKING:  # the table itself imports no torch: the CLI reads it to build its choices
    import torch

    from .editor import Editor
    from .hparams import EditHParams


@dataclass(frozen=True)
class SolveInputs:
    """What a solve gets for one layer of the layer loop."""

    editor: "Editor"  # its cached factorisations: solver(layer), null_space(layer), second_moments, hp
    layer: int
    K: "torch.Tensor"  # (d_in, n) keys, one fact per column
    R: "torch.Tensor"  # (d_out, n) this layer's share of the residual (float64)
    W: "torch.Tensor"  # (d_out, d_in) the current weight, math orientation (float64)
    past: "torch.Tensor | None"  # (d_in, d_in) Σ K_p K_pᵀ of past edits, or None


Solve = Callable[[SolveInputs], "tuple[torch.Tensor, torch.Tensor, dict]"]  # (left, right, diag)


class UnknownMethod(ValueError):
    """A method name the table does not hold."""


@dataclass(frozen=True)
class Method:
    name: str
    optimise: Literal["mlp", "pmet", "none"]
    solve: Solve | None  # None: computed by its own editor class (MALMEN)
    distribution: str | None = None  # forced layer spreading; None: the hyperparameters' own
    max_batch: int | None = None  # facts per compute(); None: any
    reads_memory: bool = False
    value_stop: Literal["patience+loss", "mpes", "none"] = "patience+loss"
    lifelong_stats: bool = False
    summary: str = ""

    def __post_init__(self):
        if (self.solve is None) != (self.optimise == "none"):
            raise ValueError(f"method {self.name}: a closed-form solve needs target values, and only it does")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"method {self.name}: unknown distribution {self.distribution!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"method {self.name}: max_batch must be ≥ 1")

    @property
    def closed_form(self) -> bool:
        return self.solve is not None

    def distribution_for(self, hp: "EditHParams") -> str:
        """The layer spreading this method runs with under `hp` (what the ledger records)."""
        return self.distribution or hp.distribution

    def value_hparams(self, hp: "EditHParams") -> "EditHParams":
        """`hp` as the v* optimisation of this method reads it (MPES ignores the loss threshold)."""
        return hp.replace(early_stop_loss=0.0) if self.value_stop == "mpes" else hp

    def check_batch(self, n: int) -> None:
        if n < 1:
            raise ValueError("no facts to edit")
        if self.max_batch is not None and n > self.max_batch:
            most = "one fact" if self.max_batch == 1 else f"at most {self.max_batch} facts"
            raise ValueError(f"{self.name} edits {most} at a time, got {n}; use emmet or memit for batches")

    def batches(self, items: list) -> list[list]:
        """`items` cut into the largest batches this method accepts (one batch when unlimited)."""
        size = self.max_batch or max(len(items), 1)
        return [items[i:i + size] for i in range(0, len(items), size)]


# --- the solves, one adapter each (imported on first use) --------------------------------------------------
def _memit(x: SolveInputs):
    from .solvers import memit_delta

    return memit_delta(x.K, x.R, x.editor.solver(x.layer), W=x.W)


def _emmet(x: SolveInputs):
    from .solvers import emmet_delta

    return emmet_delta(x.K, x.R, x.editor.solver(x.layer), x.editor.hp.emmet_ridge, W=x.W)


def _rome(x: SolveInputs):
    from .solvers import rome_delta

    return rome_delta(x.K, x.R, x.editor.solver(x.layer), W=x.W)


def _pmet(x: SolveInputs):
    from .pmet import pmet_delta

    return pmet_delta(x.K, x.R, x.editor.solver(x.layer), W=x.W)


def _alphaedit(x: SolveInputs):
    from .solvers import alphaedit_delta

    basis, info = x.editor.null_space(x.layer)
    alpha = x.editor.hp.alphaedit_l2 * info["null_mean_energy"]
    left, right, diag = alphaedit_delta(x.K, x.R, basis, alpha, memory=x.past, W=x.W)
    diag.update(null_energy=info["null_energy"])
    return left, right, diag


def _encore(x: SolveInputs):
    from .solvers import encore_delta

    C = x.editor.second_moments[x.layer]  # (d_in, d_in)
    lam = x.editor.hp.mom2_weight
    alpha = x.editor.hp.encore_alpha * lam * float(C.diagonal().double().mean())
    return encore_delta(x.K, x.R, C, lam, alpha, memory=x.past, W=x.W)


# Display order: the CLI's choices and the benchmark table follow it.
_TABLE = (
    Method("emmet", "mlp", _emmet, summary="EMMET: equality-constrained, (W+ΔW)K = V"),
    Method("memit", "mlp", _memit, summary="MEMIT: least squares with λC"),
    Method("rome", "mlp", _rome, distribution="last", max_batch=1,
           summary="ROME: one fact, one layer, rank one"),
    Method("pmet", "pmet", _pmet, distribution="sqrt",
           summary="PMET: attention + MLP v*, MEMIT's solve on the MLP part, 1/√(layers left)"),
    Method("alphaedit", "mlp", _alphaedit, reads_memory=True,
           summary="AlphaEdit: projected onto the null space of C, past edits kept"),
    Method("encore", "mlp", _encore, reads_memory=True, value_stop="mpes",
           summary="ENCORE: MEMIT + past edits + Frobenius penalty, MPES"),
    Method("malmen", "none", None, value_stop="none",
           summary="MALMEN: a trained hyper-network (editors.malmen)"),
    Method("ultraedit", "none", None, value_stop="none", lifelong_stats=True,
           summary="UltraEdit: lifelong-normalised gradients, ridge solve, no v* (editors.ultraedit)"),
)
METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _TABLE})


def get_method(name: str) -> Method:
    """The entry for `name`; UnknownMethod (a ValueError) naming the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethod(f"unknown editor {name!r} (choose from {', '.join(METHODS)})") from None


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def closed_form_names() -> tuple[str, ...]:
    """The methods editors.editor.Editor computes (all but the hyper-network ones)."""
    return tuple(m.name for m in METHODS.values() if m.closed_form)


def lifelong_names() -> tuple[str, ...]:
    """The methods that read the past-edit memory."""
    return tuple(m.name for m in METHODS.values() if m.reads_memory)


def lifelong_stats_names() -> tuple[str, ...]:
    """The methods whose normalisation statistics the ledger keeps (UltraEdit)."""
    return tuple(m.name for m in METHODS.values() if m.lifelong_stats)
