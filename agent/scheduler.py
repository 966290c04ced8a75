"""The scheduler: which pending facts are applied, in which batches, by which editor. Pure Python.

Conflicts. Two pending facts about the same subject with the same prompt template (compared after
NFKC normalisation, case folding and squeezing spaces) cannot both hold: the newer one (higher id)
supersedes the older, which becomes `superseded` with `superseded_by` set. Facts already applied
are not touched (a newer edit on top of an applied one simply wins in the weights).

Batches. The surviving facts, oldest first, are cut into batches of `batch_size` (ROME: 1).

MALMEN. Off in `auto` by default (`malmen_min_batch` 0). With `config set malmen_min_batch N`
and a current hyper-network (setting `malmen_hypernet`, the sha256 `knowledger hypernet add`
registered), `auto` picks MALMEN for every batch of at least N facts, before any rule below: a
trained hyper-network edits a thousand facts in one pass of the model per chunk, 48× faster than
MEMIT here, where the closed-form editors optimise a v* per fact. Why off: measured on 1,000
CounterFact-val facts in one batch (docs/benchmarks.md), the hyper-network this CPU could train in
40 minutes reaches efficacy 0.94 but paraphrase 0.52 and neighbourhood 0.55 against MEMIT's
figures on the same facts, and ×2.4 perplexity: fast, not yet good enough to pick unasked.
MALMEN keeps no past-edit memory (like EMMET and MEMIT); a hyper-network is trained for one model
shape and set of layers (editors.malmen.check_compatible).

Editor. `auto` picks EMMET for a batch smaller than `auto_memit_min_batch` facts and MEMIT from
that size on (a workspace setting, default 256). Measured on the default model
(docs/benchmarks.md, 100 CounterFact facts): EMMET beats MEMIT on efficacy at batch 1, 10 and
100 alike (0.99 vs 0.89-0.92; top-1 0.74-0.81 vs 0.43-0.47) at the same speed, MEMIT keeps the
neighbourhood 0.02-0.06 better; no crossover up to 100. EMMET's equalities become nearly
dependent as the batch approaches the key width (1536 here), where MEMIT's least squares degrade
gracefully; 256 is a sixth of that width, beyond what was measured. ROME and PMET only when
asked; ROME edits one fact per batch.

UltraEdit. Only when asked (`--editor ultraedit`); `auto` never picks it, and it cannot be the
`lifelong_editor` (that setting accepts the past-edit-memory editors only): its quality on the
default model is measured on 100 counterfact-train facts (docs/lifelong.md), not at scale, and
not against ENCORE over a long sequence.

Lifelong policy. `auto` switches to the workspace's `lifelong_editor` (AlphaEdit or ENCORE, which
keep earlier edits through the past-edit memory) once the workspace holds `lifelong_min_active`
applied facts, or once the most-changed edited layer has drifted by `lifelong_norm_growth`
(‖W − W_base‖_F / ‖W_base‖_F, recorded by every operation) — whichever comes first. The
evidence for the defaults is in docs/lifelong.md (1,000 sequential CounterFact edits).

Workspace settings (ledger `settings` table, see `EditSettings`): batch_size,
auto_memit_min_batch, lifelong_min_active, lifelong_norm_growth, lifelong_editor, malmen_min_batch,
malmen_hypernet (set by `knowledger hypernet add/use`), and what the key statistics and
hyperparameters are made of (stats_corpus, stats_tokens, hparams_preset, hparams_overrides).
Values given to `apply` are stored, so every later apply, undo, redo and replay uses the same
statistics and hyperparameters.
"""
from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from knowledger.editors.methods import get_method, lifelong_names, method_names
from knowledger.ledger import repository as repo

EDITORS = method_names()  # editors.methods: the table of methods
EDITOR_CHOICES = ("auto",) + EDITORS
LIFELONG_EDITORS = lifelong_names()
MALMEN = "malmen"
ULTRAEDIT = "ultraedit"  # never picked by auto (see the module docstring)
DIRECT_EDITORS = tuple(e for e in EDITOR_CHOICES if e != "auto")  # edit and bench: a named editor
DEFAULT_BATCH_SIZE = 16
DEFAULT_MEMIT_MIN_BATCH = 256  # see the module docstring and docs/benchmarks.md
DEFAULT_LIFELONG_MIN_ACTIVE = 200  # see the module docstring and docs/lifelong.md
DEFAULT_LIFELONG_NORM_GROWTH = 0.3  # ‖W − W_base‖_F / ‖W_base‖_F of the most-changed edited layer
DEFAULT_LIFELONG_EDITOR = "encore"
DEFAULT_MALMEN_MIN_BATCH = 0  # 0: auto never picks MALMEN; see the module docstring


@dataclass(frozen=True)
class History:
    """What the scheduler knows of a workspace's past: active edits and the weights' drift."""

    active_edits: int = 0  # facts currently applied
    norm_growth: float = 0.0  # max over edited layers of ‖W − W_base‖_F / ‖W_base‖_F


@dataclass(frozen=True)
class EditSettings:
    batch_size: int = DEFAULT_BATCH_SIZE
    auto_memit_min_batch: int = DEFAULT_MEMIT_MIN_BATCH
    # read from the module constants when an EditSettings is made (tests pin them)
    lifelong_min_active: int = field(default_factory=lambda: DEFAULT_LIFELONG_MIN_ACTIVE)
    lifelong_norm_growth: float = field(default_factory=lambda: DEFAULT_LIFELONG_NORM_GROWTH)
    lifelong_editor: str = field(default_factory=lambda: DEFAULT_LIFELONG_EDITOR)
    malmen_min_batch: int = field(default_factory=lambda: DEFAULT_MALMEN_MIN_BATCH)
    malmen_hypernet: str | None = None  # sha256 of the current hyper-network (agent.hypernets)
    stats_corpus: str | None = None  # absolute path; None: text sampled from the base model
    stats_tokens: int | None = None  # None: the hyperparameters' stats_tokens
    hparams_preset: str | None = None  # None: the model family's preset
    hparams_overrides: dict[str, Any] = field(default_factory=dict)
    consolidate_every: int = 0  # apply consolidates once this many facts were applied since (0: off)

    @classmethod
    def load(cls, session) -> EditSettings:
        stored = {k: repo.get_setting(session, k) for k in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in stored.items() if v is not None})

    def save(self, session) -> None:
        """Store the settings a command ran with (`malmen_hypernet` is left to agent.hypernets:
        an apply never changes it, and must not put back an older value set meanwhile)."""
        for key, value in asdict(self).items():
            if key != "malmen_hypernet" and repo.get_setting(session, key) != value:
                repo.set_setting(session, key, value)

    def updated(self, *, batch_size: int | None = None, corpus: str | Path | None = None,
                stats_tokens: int | None = None, overrides: dict | None = None,
                preset: str | None = None) -> tuple[EditSettings, list[str]]:
        """These settings with the given values in; and a line per setting that changed."""
        new = dict(batch_size=batch_size, stats_corpus=str(Path(corpus).expanduser().resolve())
                   if corpus else None, stats_tokens=stats_tokens, hparams_preset=preset,
                   hparams_overrides={**self.hparams_overrides, **overrides} if overrides else None)
        changes = {k: v for k, v in new.items() if v is not None and getattr(self, k) != v}
        return replace(self, **changes), [f"setting {k} = {v}" for k, v in changes.items()]


@dataclass(frozen=True)
class PendingFact:
    id: int
    prompt: str
    subject: str
    target_new: str

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class PlannedBatch:
    index: int
    editor: str
    fact_ids: tuple[int, ...]
    reason: str  # why this editor


@dataclass
class Plan:
    batches: list[PlannedBatch]
    superseded: list[tuple[int, int]]  # (older fact, newer fact that supersedes it)

    def as_dict(self, facts: dict[int, PendingFact] | None = None) -> dict:
        view = lambda i: (dict(id=i, text=facts[i].text, target_new=facts[i].target_new)  # noqa: E731
                          if facts and i in facts else dict(id=i))
        return dict(batches=[dict(index=b.index, editor=b.editor, reason=b.reason,
                                  facts=[view(i) for i in b.fact_ids]) for b in self.batches],
                    superseded=[dict(fact=old, superseded_by=new) for old, new in self.superseded])


def _norm(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def conflict_key(prompt: str, subject: str) -> tuple[str, str]:
    return _norm(prompt), _norm(subject)


def resolve_conflicts(facts: list[PendingFact]) -> tuple[list[PendingFact], list[tuple[int, int]]]:
    """(the facts that survive, oldest first; (older, newer) pairs where newer supersedes older)."""
    newest: dict[tuple[str, str], PendingFact] = {}
    for f in sorted(facts, key=lambda f: f.id):
        newest[conflict_key(f.prompt, f.subject)] = f
    keep_ids = {f.id for f in newest.values()}
    superseded = [(f.id, newest[conflict_key(f.prompt, f.subject)].id)
                  for f in sorted(facts, key=lambda f: f.id) if f.id not in keep_ids]
    return [f for f in sorted(facts, key=lambda f: f.id) if f.id in keep_ids], superseded


def choose_editor(n: int, requested: str, memit_min_batch: int, history: History | None = None,
                  settings: EditSettings | None = None) -> tuple[str, str]:
    """(editor, reason) for a batch of n facts, given the workspace's history."""
    if requested not in EDITOR_CHOICES:
        raise ValueError(f"unknown editor {requested!r} (choose from {', '.join(EDITOR_CHOICES)})")
    if requested != "auto":
        return requested, "asked for"
    st = settings or EditSettings()
    h = history or History()
    if st.malmen_hypernet and st.malmen_min_batch and n >= st.malmen_min_batch:
        return MALMEN, (f"auto: {n} facts ≥ malmen_min_batch {st.malmen_min_batch}, hyper-network "
                        f"{st.malmen_hypernet[:12]}")
    if h.active_edits >= st.lifelong_min_active:
        return st.lifelong_editor, (f"auto: {h.active_edits} active edits ≥ lifelong_min_active "
                                    f"{st.lifelong_min_active}")
    if h.norm_growth >= st.lifelong_norm_growth:
        return st.lifelong_editor, (f"auto: weight drift {h.norm_growth:.3f} ≥ lifelong_norm_growth "
                                    f"{st.lifelong_norm_growth}")
    if n >= memit_min_batch:
        return "memit", f"auto: {n} facts ≥ auto_memit_min_batch {memit_min_batch}"
    return "emmet", f"auto: {n} facts < auto_memit_min_batch {memit_min_batch}"


def batch_limit(editor: str) -> int | None:
    """The most facts one batch of `editor` may hold (editors.methods), None for any; None for
    auto and for bench's "none" (the unedited baseline)."""
    return None if editor in ("auto", "none") else get_method(editor).max_batch


def plan(facts: list[PendingFact], *, batch_size: int, editor: str = "auto",
         memit_min_batch: int = DEFAULT_MEMIT_MIN_BATCH, history: History | None = None,
         settings: EditSettings | None = None) -> Plan:
    """Resolve conflicts, cut the survivors into batches and pick each batch's editor.

    The history's active edits grow by each planned batch (a long apply switches to the lifelong
    editor part-way); its norm growth is the one measured before the apply."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    choose_editor(1, editor, memit_min_batch)  # validates the name
    size = min(batch_size, batch_limit(editor) or batch_size)
    kept, superseded = resolve_conflicts(facts)
    batches = []
    for i in range(0, len(kept), size):
        ids = tuple(f.id for f in kept[i:i + size])
        h = replace(history or History(), active_edits=(history or History()).active_edits
                    + sum(len(b.fact_ids) for b in batches))
        name, reason = choose_editor(len(ids), editor, memit_min_batch, h, settings)
        if size < batch_size:
            reason += f" ({editor.upper()} edits {'one fact' if size == 1 else f'at most {size} facts'} per batch)"
        batches.append(PlannedBatch(index=len(batches) + 1, editor=name, fact_ids=ids, reason=reason))
    return Plan(batches=batches, superseded=superseded)
