"""`audit --watch`: audit now, then whenever the ledger head moves or a period passes."""
from __future__ import annotations

import math
import time

from knowledger.agent.audit import audit
from knowledger.agent.errors import NO_BASE_MODEL, KnowledgerError
from knowledger.agent.live import expected_state
from knowledger.agent.workspace import Workspace
from knowledger.ledger import repository as repo


def head_state(ws: Workspace) -> tuple:
    """(base id, head seq, head weights hash): what `watch` compares to see the ledger move."""
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError(NO_BASE_MODEL)
        want, head = expected_state(s, base)
        return base.id, head, want


def watch(ws: Workspace, *, interval_s: float, on_report, on_error, device: str = "auto",
          heal_drift: bool = False, batch_size: int | None = None, progress=None,
          max_audits: int | None = None, sleep=time.sleep):
    """Audit now, then whenever the ledger head moves (polled every min(interval, 5 s)) or every
    interval_s seconds, handing each AuditResult to on_report and each error to on_error. Returns
    the last audit's result (None when it failed) once max_audits is reached; KeyboardInterrupt
    propagates (the CLI turns it into a clean exit)."""
    poll = max(0.01, min(interval_s, 5.0))
    last_state, last_at, n, last = None, -math.inf, 0, None
    while True:
        state = head_state(ws)
        if state != last_state or time.monotonic() - last_at >= interval_s:
            try:
                report = audit(ws, device=device, heal_drift=heal_drift, batch_size=batch_size,
                               progress=progress, wait=True)
                last = report
                on_report(report)
            except (KnowledgerError, ValueError) as e:
                last = None
                on_error(e)
            last_state, last_at, n = head_state(ws), time.monotonic(), n + 1
            if max_audits is not None and n >= max_audits:
                return last
        sleep(poll)
