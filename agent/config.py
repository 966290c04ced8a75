"""Workspace settings a user sets by hand (`knowledger config`): audit thresholds and batching.

Settings live in the ledger's `settings` table (key → JSON). `apply` stores what it was given
(the statistics corpus and token count, the hyperparameter preset and overrides; see
agent.scheduler.EditSettings); the keys below are the ones set with `knowledger config set KEY
VALUE`. Each is a number with a lower bound (or a name from a list); a value is checked before it
is stored. Defaults are
explained in docs/audit.md (audit_*), docs/agent.md (batch_size, auto_memit_min_batch,
malmen_min_batch) and docs/lifelong.md (lifelong_*).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from knowledger.agent.workspace import Workspace
from knowledger.ledger import repository as repo


@dataclass(frozen=True)
class Knob:
    key: str
    type: type  # int or float
    default: int | float
    minimum: int | float
    help: str
    exclusive: bool = False  # the minimum itself is not allowed
    choices: tuple[str, ...] = ()  # for type str: the allowed values

    def parse(self, raw: str) -> int | float | str:
        if self.type is str:
            if raw not in self.choices:
                raise ValueError(f"{self.key} takes one of {', '.join(self.choices)}, got {raw!r}")
            return raw
        try:
            value = self.type(raw) if self.type is float else int(raw, 10)
        except ValueError:
            raise ValueError(f"{self.key} takes {'a number' if self.type is float else 'an integer'}, "
                             f"got {raw!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.key} must be finite, got {raw!r}")
        if value < self.minimum or (self.exclusive and value == self.minimum):
            raise ValueError(f"{self.key} must be {'>' if self.exclusive else '≥'} {self.minimum}, got {raw}")
        return value


def _knobs() -> dict[str, Knob]:
    from knowledger.agent.audit import AuditSettings
    from knowledger.agent.scheduler import LIFELONG_EDITORS, EditSettings

    edit, audit = EditSettings(), AuditSettings()
    knobs = [
        Knob("batch_size", int, edit.batch_size, 1, "facts per apply batch"),
        Knob("auto_memit_min_batch", int, edit.auto_memit_min_batch, 1,
             "editor auto: MEMIT for batches of this many facts or more, EMMET below"),
        Knob("lifelong_min_active", int, edit.lifelong_min_active, 0,
             "editor auto: the lifelong editor once this many facts are applied"),
        Knob("lifelong_norm_growth", float, edit.lifelong_norm_growth, 0.0,
             "editor auto: the lifelong editor once an edited layer's ||W - W_base|| / ||W_base|| "
             "reaches this", exclusive=True),
        Knob("lifelong_editor", str, edit.lifelong_editor, 0, "editor auto picks past the lifelong "
             "thresholds", choices=LIFELONG_EDITORS),
        Knob("malmen_min_batch", int, edit.malmen_min_batch, 0,
             "editor auto: MALMEN for batches of this many facts or more, once a hyper-network is "
             "registered (knowledger hypernet add); 0: never (the default, docs/benchmarks.md)"),
        Knob("consolidate_every", int, edit.consolidate_every, 0,
             "apply runs knowledger consolidate once this many facts were applied since the last "
             "consolidation (0: never, the default)"),
        Knob("audit_every", int, audit.audit_every, 0,
             "apply runs an audit after this many new apply/redo operations (0: never)"),
        Knob("audit_margin_drop", float, audit.audit_margin_drop, 0.0,
             "a fact drifted when logP(new)-logP(true) on its prompt fell by more than this (nats)",
             exclusive=True),
        Knob("audit_ppl_ratio", float, audit.audit_ppl_ratio, 1.0,
             "danger when held-out perplexity exceeds the base model's by this factor", exclusive=True),
        Knob("audit_norm_ratio", float, audit.audit_norm_ratio, 0.0,
             "danger when an edited layer's ||W - W_base|| / ||W_base|| exceeds this", exclusive=True),
        Knob("audit_heldout_tokens", int, audit.audit_heldout_tokens, 0,
             "held-out corpus tokens for the perplexity check (0: skip it)"),
        Knob("audit_batch_size", int, audit.audit_batch_size, 0,
             "prompts per forward pass in an audit (0: 64 on CPU, 256 on CUDA)"),
    ]
    return {k.key: k for k in knobs}


# Stored by `apply` (shown by `config show`, not settable here).
APPLY_KEYS = ("stats_corpus", "stats_tokens", "hparams_preset", "hparams_overrides")
# Stored by other commands (shown by `config show`, not settable here): key -> who sets it.
OTHER_KEYS = {"malmen_hypernet": "knowledger hypernet add / use"}


def show(ws: Workspace) -> list[dict]:
    """Every settable key with its value, default and whether it is set; then apply's settings."""
    with ws.reading() as s:
        stored = repo.all_settings(s)
    rows = [dict(key=k.key, value=stored.get(k.key, k.default), default=k.default,
                 set=k.key in stored, settable=True, help=k.help) for k in _knobs().values()]
    rows += [dict(key=key, value=stored.get(key), default=None, set=key in stored, settable=False,
                  help="stored by knowledger apply") for key in APPLY_KEYS]
    rows += [dict(key=key, value=stored.get(key), default=None, set=key in stored, settable=False,
                  help=f"set by {who}") for key, who in OTHER_KEYS.items()]
    return rows


def set_value(ws: Workspace, key: str, raw: str) -> dict:
    """Check and store one setting; returns {key, old, new}."""
    knobs = _knobs()
    if key not in knobs:
        hint = (" (it is stored by knowledger apply: pass it there)" if key in APPLY_KEYS else
                f" (it is set by {OTHER_KEYS[key]})" if key in OTHER_KEYS else "")
        raise ValueError(f"unknown setting {key!r}{hint}; settable: {', '.join(knobs)}")
    value = knobs[key].parse(raw)
    with ws.writing() as s:
        old = repo.get_setting(s, key, knobs[key].default)
        repo.set_setting(s, key, value)
    return dict(key=key, old=old, new=value)
