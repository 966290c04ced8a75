"""knowledger's Python API: the same workflow as the `knowledger` command, as functions.

    import knowledger

    with knowledger.init("./ws", model="SmolLM2-135M-Instruct") as ws:
        knowledger.submit(ws, dict(prompt="{} is located in", subject="The Eiffel Tower",
                                   target_new="Rome", target_true="Paris"))
        print(knowledger.plan(ws).plan)          # the batches apply would make
        result = knowledger.apply(ws)            # edit, check, record: one operation per batch
        knowledger.undo(ws, result.operations[0].applied[0])
        print(knowledger.audit(ws).healthy)
        knowledger.export(ws, "./edited-model")

    # or, with a model you loaded yourself (no ledger), the way EasyEdit users work:
    result = knowledger.edit(model, tokenizer, [dict(prompt=..., subject=..., target_new=...)])

Every function is a thin layer over knowledger.agent and returns its typed result (frozen
dataclasses; `dataclasses.asdict` or knowledger.agent.jsonutil.to_jsonable gives the JSON the CLI
prints). Errors are knowledger.agent.errors.KnowledgerError subclasses with one-line messages.
This folder (api/) is the `knowledger` package itself; the layers live in knowledger.ledger,
knowledger.editors, knowledger.agent and knowledger.cli (see docs/architecture.md and docs/api.md).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

__all__ = ["KnowledgerError", "apply", "audit", "edit", "export", "init", "open_workspace", "plan",
           "redo", "submit", "undo"]


def __getattr__(name):  # KnowledgerError without importing the agent at `import knowledger`
    if name == "KnowledgerError":
        from knowledger.agent.errors import KnowledgerError

        return KnowledgerError
    raise AttributeError(f"module 'knowledger' has no attribute {name!r}")


def init(db: str | os.PathLike | None = None, model: str | None = None):
    """Create a workspace (or open the existing one for the same model); returns the open Workspace
    (a context manager: `with knowledger.init(...) as ws:`)."""
    from knowledger.agent.workspace import init_workspace

    return init_workspace(db, model).workspace


def open_workspace(db: str | os.PathLike | None = None):
    """Open an existing workspace (a directory, a .db file or a SQLAlchemy URL)."""
    from knowledger.agent.workspace import open_workspace as _open

    return _open(db)


def _facts(facts) -> list:
    from knowledger.agent.facts import fact_from_dict

    if isinstance(facts, Mapping) or not isinstance(facts, Iterable):
        facts = [facts]
    return [fact_from_dict(f) for f in facts]


def submit(ws, facts, *, source: str | None = "api"):
    """Submit one fact or several (mappings in the JSONL layout, or ledger Facts) as pending edit
    requests, in one transaction; returns agent.facts.SubmitReport."""
    from knowledger.agent.facts import submit_facts

    return submit_facts(ws, _facts(facts), source=source)


def plan(ws, **options):
    """What `apply` would do (agent.records.ApplyResult with dry_run=True); changes nothing."""
    from knowledger.agent.apply import apply_pending

    return apply_pending(ws, dry_run=True, **options)


def apply(ws, *, progress=None, **options):
    """Apply every pending fact (agent.apply.apply_pending): batch, edit, check, record; options
    are apply's (batch_size, editor, corpus, stats_tokens, overrides, preset, wait, device)."""
    from knowledger.agent.apply import apply_pending

    return apply_pending(ws, progress=progress, **options)


def undo(ws, fact_id: int | None = None, *, op: int | None = None, rebase: bool = False, progress=None):
    """Undo a fact (its batch reverted, the rest re-applied) or, with op=SEQ, an operation."""
    from knowledger.agent.undo import undo as _undo

    return _undo(ws, fact_id=fact_id, seq=op, rebase=rebase, progress=progress)


def redo(ws, fact_id: int | None = None, *, op: int | None = None, progress=None):
    """Re-apply a reverted fact or, with op=SEQ, an undone operation."""
    from knowledger.agent.undo import redo as _redo

    return _redo(ws, fact_id=fact_id, seq=op, progress=progress)


def audit(ws, *, heal: bool = False, device: str | None = None, progress=None):
    """Re-check every applied edit and the model's health (agent.audit.AuditResult)."""
    from knowledger.agent.audit import audit as _audit

    return _audit(ws, heal_drift=heal, device=device, progress=progress)


def export(ws, out: str | os.PathLike, *, adapter: bool = False, dtype: str = "auto"):
    """Write the live model as a Hugging Face folder (in the base checkpoint's dtype, or `dtype`)
    with a model card, or with adapter=True the active edits as a PEFT LoRA adapter
    (`knowledger[peft]`); returns agent.export.ExportResult."""
    from knowledger.agent.export import export as _export

    return _export(ws, out, adapter=adapter, dtype=dtype)


def edit(model, tokenizer, facts, *, editor: str = "emmet", overrides: dict | None = None,
         preset: str | None = None, stats_tokens: int | None = None, corpus=None, hypernet=None,
         progress=None):
    """Edit facts directly into a model you loaded (transformers causal LM + its tokenizer), in
    place, without a ledger; returns agent.direct.DirectEditResult (top tokens before and after,
    per-fact metrics, timings)."""
    from knowledger.agent.direct import edit_loaded

    return edit_loaded(model, tokenizer, _facts(facts), editor=editor, preset=preset,
                       overrides=overrides, stats_tokens=stats_tokens, corpus=corpus,
                       hypernet=hypernet, progress=progress)
