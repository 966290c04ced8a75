"""Submitting facts to a workspace and reading them back, as JSON-ready dicts for the CLI.

A file is one transaction: with any invalid row nothing of it is stored (InvalidFacts lists every
problem as "file:line: reason"), unless `skip_invalid`, which stores the valid rows and reports the
rest. A fact that duplicates a pending fact (same fingerprint) is reported, never stored twice;
within a file, a repeated fact is a duplicate of its first occurrence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from knowledger.agent.jsonutil import iso
from knowledger.agent.workspace import Workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import InvalidFacts
from knowledger.ledger.facts import Fact, parse_neighbor, read_facts, validate_fact
from knowledger.ledger.models import Operation, OperationStatus, Request, RequestStatus


@dataclass
class SubmitReport:
    """What a submission did. `where` is "file:line" for file rows, "" for a single fact."""

    stored: list[tuple[str, int]] = field(default_factory=list)  # (where, new fact id)
    duplicates: list[tuple[str, int]] = field(default_factory=list)  # (where, pending fact id)
    invalid: list[str] = field(default_factory=list)  # "where: reason", not stored

    def as_dict(self) -> dict:
        return dict(stored=[dict(where=w, id=i) for w, i in self.stored],
                    duplicates=[dict(where=w, duplicate_of=i) for w, i in self.duplicates],
                    invalid=list(self.invalid))


def fact_from_options(prompt: str, subject: str, target: str, target_true: str | None = None,
                      paraphrases=(), neighbors=(), *, source: str | None = None) -> Fact:
    """One fact from the command line; neighbors as "PROMPT=ANSWER" strings. ValueError if invalid."""
    return validate_fact(prompt, subject, target, target_true, list(paraphrases),
                         [parse_neighbor(n) for n in neighbors], source=source)


def fact_from_dict(d) -> Fact:
    """A fact given as a mapping (the JSONL layout: prompt, subject, target_new or target,
    target_true, paraphrases, neighborhood), or a Fact as it is. ValueError if invalid."""
    if isinstance(d, Fact):
        return d
    return validate_fact(d.get("prompt"), d.get("subject"), d.get("target_new", d.get("target")),
                         d.get("target_true"), d.get("paraphrases") or (), d.get("neighborhood") or (),
                         source=d.get("source"))


def read_fact_file(path: str | os.PathLike) -> list[Fact]:
    """Every fact of a .jsonl/.csv/.json file; the first invalid row refuses the file."""
    rows = read_facts(path)
    bad = [r for r in rows if not r.ok]
    if bad:
        raise InvalidFacts([f"{path}:{bad[0].line}: {bad[0].error}"])
    return [r.fact for r in rows]


def submit_facts(ws: Workspace, facts: list[Fact], *, source: str | None = "cli",
                 where: list[str] | None = None) -> SubmitReport:
    """Store facts in one transaction (duplicates of pending facts skipped)."""
    where = where or [""] * len(facts)
    report = SubmitReport()
    with ws.writing() as s:
        for added in repo.add_requests(s, facts, source=source):
            if added.request_id is not None:
                report.stored.append((where[added.index], added.request_id))
            else:
                report.duplicates.append((where[added.index], added.duplicate_of))
    return report


def submit_fact(ws: Workspace, fact: Fact, *, source: str | None = "cli") -> SubmitReport:
    return submit_facts(ws, [fact], source=source)


def submit_file(ws: Workspace, path: str | os.PathLike, *, skip_invalid: bool = False,
                source: str | None = None) -> SubmitReport:
    """Read and store a fact file; facts without a source get `source`, else the file name."""
    path = Path(path)
    rows = read_facts(path)
    problems = [f"{path.name}:{r.line}: {r.error}" for r in rows if not r.ok]
    valid = [r for r in rows if r.ok]
    if problems and not skip_invalid:
        raise InvalidFacts(problems, summary=None if len(problems) == 1 else
                           f"nothing stored from {path.name}: {len(problems)} invalid rows "
                           f"(--skip-invalid stores the {len(valid)} valid ones)")
    report = submit_facts(ws, [r.fact for r in valid], source=source or path.name,
                          where=[f"{path.name}:{r.line}" for r in valid])
    report.invalid = problems
    return report


# --- reading -------------------------------------------------------------------------------------
def fact_view(r: Request) -> dict:
    return dict(id=r.id, status=r.status.value, prompt=r.prompt, subject=r.subject,
                text=r.prompt.format(r.subject), target_new=r.target_new, target_true=r.target_true,
                paraphrases=list(r.paraphrase_prompts or []),
                neighborhood=[dict(n) for n in r.neighborhood or []], source=r.source,
                case_id=r.case_id, submitted_at=iso(r.submitted_at), status_reason=r.status_reason,
                superseded_by=r.superseded_by_id, fingerprint=r.fingerprint)


def operation_view(op: Operation, n_facts: int | None = None, hypernet_sha256: str | None = None) -> dict:
    """An operation as listings show it; `hypernet_sha256`: the MALMEN hyper-network it ran on."""
    return dict(id=op.id, seq=op.seq, kind=op.kind.value, status=op.status.value, editor=op.editor,
                distribution=op.distribution, layers=op.layers_json, facts=n_facts,
                target_operation_id=op.target_operation_id, started_at=iso(op.started_at),
                finished_at=iso(op.finished_at), error=op.error,
                weights_sha256_after=op.weights_sha256_after, hypernet_sha256=hypernet_sha256)


def list_facts(ws: Workspace, *, status: str | None = None, limit: int | None = 20) -> list[dict]:
    """Facts, newest first."""
    with ws.reading() as s:
        return [fact_view(r) for r in repo.list_requests(s, status=status, limit=limit)]


def list_operations(ws: Workspace, *, status: str | None = None, limit: int | None = 20) -> list[dict]:
    """Operations, newest (highest seq) first, with how many facts each handled."""
    with ws.reading() as s:
        ops = repo.list_operations(s, status=status, limit=limit)
        counts = repo.operation_request_counts(s, [op.id for op in ops])
        shas = repo.artifact_shas(s, [op.artifact_id for op in ops])
        return [operation_view(op, counts.get(op.id, 0), shas.get(op.artifact_id)) for op in ops]


def show_fact(ws: Workspace, fact_id: int) -> dict:
    """One fact with its status history, the operations that handled it and what it superseded."""
    with ws.reading() as s:
        view = fact_view(repo.get_request(s, fact_id))
        view["history"] = [dict(at=iso(e.at), status=e.status.value, reason=e.reason,
                                operation_id=e.operation_id) for e in repo.request_history(s, fact_id)]
        held = repo.request_operations(s, fact_id)
        shas = repo.artifact_shas(s, [op.artifact_id for op, _ in held])
        view["operations"] = [dict(seq=op.seq, kind=op.kind.value, status=op.status.value,
                                   outcome=link.outcome.value, editor=op.editor,
                                   hypernet_sha256=shas.get(op.artifact_id))
                              for op, link in held]
        view["supersedes"] = repo.superseded_facts(s, fact_id)
    return view


FACT_STATUSES = tuple(s.value for s in RequestStatus)
OPERATION_STATUSES = tuple(s.value for s in OperationStatus)
