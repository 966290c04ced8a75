"""The artifacts table (MALMEN hyper-networks by sha256) and operations.artifact_id. No model."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from knowledger.agent.workspace import open_workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import NotFound
from knowledger.ledger.models import Artifact, OperationKind

SHA = "ab" * 32


def register(ws_dir, sha=SHA, path="artifacts/a", meta=None):
    with open_workspace(ws_dir) as ws, ws.writing() as s:
        row, created = repo.register_artifact(s, kind="malmen-hypernet", sha256=sha, path=path, meta=meta)
        return row.id, created


def test_registering_the_same_sha_twice_is_one_row_and_changes_nothing(ws_dir):
    first = register(ws_dir, meta={"meta": {"step": 5}})
    again = register(ws_dir, path="/elsewhere", meta={"meta": {"step": 9}})
    assert first == (1, True) and again == (1, False)
    with open_workspace(ws_dir) as ws, ws.reading() as s:
        assert s.scalar(select(func.count()).select_from(Artifact)) == 1
        row = repo.artifact_by_sha(s, SHA)
        assert (row.kind, row.path, row.meta_json) == ("malmen-hypernet", "artifacts/a", {"meta": {"step": 5}})
        assert row.created_at is not None and repo.get_artifact(s, 1).sha256 == SHA
        assert repo.artifact_by_sha(s, "cd" * 32) is None


def test_the_database_refuses_a_second_row_with_the_same_sha(ws_dir):
    register(ws_dir)
    with open_workspace(ws_dir) as ws:
        with pytest.raises(IntegrityError, match="(?i)unique"), ws.engine.begin() as conn:
            conn.execute(text("INSERT INTO artifacts (kind, sha256, path, created_at) "
                              "VALUES ('malmen-hypernet', :sha, 'x', '2026-01-01 00:00:00')"), dict(sha=SHA))


def test_listing_lookup_and_the_operation_link(ws_dir):
    a, _ = register(ws_dir)
    b, _ = register(ws_dir, sha="cd" * 32, path="/abs/b")
    with open_workspace(ws_dir) as ws:
        with ws.writing() as s:
            base = repo.current_base_model(s).id
            op = repo.record_operation(s, kind=OperationKind.apply, base_model_id=base, editor="malmen",
                                       artifact_id=b)
            plain = repo.record_operation(s, kind=OperationKind.apply, base_model_id=base, editor="emmet")
        with ws.reading() as s:
            assert [r.id for r in repo.list_artifacts(s)] == [a, b]
            assert [r.id for r in repo.list_artifacts(s, kind="other")] == []
            assert repo.artifact_shas(s, [op.artifact_id, plain.artifact_id, None]) == {b: "cd" * 32}
            assert repo.artifact_shas(s, []) == {}
            with pytest.raises(NotFound, match="no artifact #99"):
                repo.get_artifact(s, 99)
        with pytest.raises(IntegrityError, match="(?i)foreign key"), ws.writing() as s:
            repo.record_operation(s, kind=OperationKind.apply, base_model_id=base, artifact_id=99)
