"""Apply, undo, redo and replay: every change of the live weights is one ledger operation.

This module is the map; the rooms are:
- agent.session: `session()` (lock, recovery, live model) and `EditSession.commit` (one write
  transaction, then the snapshot);
- agent.recipes: what a batch is computed with (EditHParams or a MALMEN hyper-network);
- agent.batch: one batch's record (edit, check, retry once), a redo with recorded deltas, an undo;
- agent.apply: `apply_pending` (plan, batches, the periodic audit);
- agent.undo: `undo`, `redo` (heal-aware);
- agent.replay: `replay`, `replay_recompute`;
- agent.records: `OpRecord` and the frozen results the commands return.
The names below are re-exported for callers that import them from here.
"""
from __future__ import annotations

from knowledger.agent.apply import apply_pending, plan_pending, workspace_history
from knowledger.agent.batch import CRITERION, CRITERION_TEXT
from knowledger.agent.errors import KnowledgerError, NothingToDo
from knowledger.agent.jsonutil import json_safe
from knowledger.agent.records import FactOutcome, OpRecord, edit_requests
from knowledger.agent.replay import replay, replay_recompute
from knowledger.agent.session import EditSession, recover, session
from knowledger.agent.undo import redo, undo
from knowledger.editors.evaluate import fact_metrics
from knowledger.ledger.models import OperationKind

__all__ = ["CRITERION", "CRITERION_TEXT", "EditSession", "FactOutcome", "KnowledgerError",
           "NothingToDo", "OpRecord", "OperationKind", "apply_pending", "edit_requests",
           "fact_metrics", "json_safe", "plan_pending", "recover", "redo", "replay",
           "replay_recompute", "session", "undo", "workspace_history"]
