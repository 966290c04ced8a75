"""The past-edit memory in the ledger: kept in step by apply / undo / redo, rebuilt when stale."""
import torch
from sqlalchemy import delete

from knowledger.agent import memory as amem
from knowledger.agent import operations as ops
from knowledger.agent.workspace import open_workspace
from knowledger.ledger import repository as repo
from knowledger.ledger.models import EditMemory
from tests.agent.helpers import GOOD, STATS_TOKENS, data, submit as submit_one

OVERRIDES = dict(layers=[1, 2], v_steps=10, n_context=1, early_stop=False, encore_alpha=0.1, mom2_weight=100.0,
                 alphaedit_null_threshold=0.5)


def submit(db, facts):
    return [submit_one(db, *f) for f in facts]


def apply(db, corpus, **kw):
    with open_workspace(db) as w:
        return data(ops.apply_pending(w, corpus=corpus, stats_tokens=STATS_TOKENS, overrides=OVERRIDES, **kw))


def stored_and_rebuilt(db):
    with open_workspace(db) as w, w.reading() as s:
        base = repo.current_base_model(s)
        stored = {m.layer: (torch.from_numpy(m.matrix), m.n_keys, m.as_of_seq) for m in repo.load_memory(s, base.id)}
        return stored, amem.rebuild(s, base.id), repo.head_operation(s, base.id).seq


def assert_consistent(db, n_keys):
    stored, rebuilt, head = stored_and_rebuilt(db)
    assert set(stored) == {1, 2}
    for layer, (M, n, seq) in stored.items():
        assert seq == head and n == rebuilt.counts.get(layer, 0) == n_keys
        torch.testing.assert_close(M, rebuilt.sums.get(layer, torch.zeros_like(M)), atol=1e-9, rtol=1e-9)


def test_memory_after_apply_undo_apply_equals_the_memory_of_the_surviving_keys(ws, corpus):
    submit(ws, GOOD[:2])
    apply(ws, corpus, batch_size=2, editor="emmet")
    assert_consistent(ws, 2)
    submit(ws, GOOD[2:4])
    apply(ws, corpus, batch_size=2, editor="alphaedit")
    assert_consistent(ws, 4)
    with open_workspace(ws) as w:
        ops.undo(w, seq=1)  # the first batch's keys leave the memory
    assert_consistent(ws, 2)
    submit(ws, GOOD[4:5])
    apply(ws, corpus, batch_size=1, editor="encore")
    assert_consistent(ws, 3)
    with open_workspace(ws) as w:
        ops.redo(w, seq=1)  # reused deltas bring their recorded keys back
    assert_consistent(ws, 5)
    stored, _, _ = stored_and_rebuilt(ws)
    assert float(stored[1][0].abs().sum()) > 0


def test_a_stale_or_missing_memory_is_rebuilt_from_the_key_vectors(ws, corpus):
    submit(ws, GOOD[:2])
    apply(ws, corpus, batch_size=2, editor="emmet")
    with open_workspace(ws) as w, w.writing() as s:  # e.g. a workspace upgraded from schema 0002
        s.execute(delete(EditMemory))
    submit(ws, GOOD[2:3])
    result = apply(ws, corpus, batch_size=1, editor="alphaedit")
    assert "past-edit memory rebuilt from the ledger's key vectors" in result["notes"]
    assert_consistent(ws, 3)


def test_replay_rebuilds_the_memory(ws, corpus):
    submit(ws, GOOD[:2])
    apply(ws, corpus, batch_size=1, editor="emmet")
    with open_workspace(ws) as w, w.writing() as s:
        s.execute(delete(EditMemory))
    with open_workspace(ws) as w:
        report = data(ops.replay(w))
    assert report["memory_rebuilt"]
    assert_consistent(ws, 2)


def test_lifelong_editors_read_the_memory(ws, corpus, monkeypatch):
    """AlphaEdit gets the session's memory (with the earlier batch's keys); EMMET gets none."""
    from knowledger.editors.editor import Editor

    seen = []
    real = Editor.compute

    def spy(self, requests, *, memory=None, progress=None):
        seen.append((self.method, None if memory is None else memory.counts.get(1, 0)))
        return real(self, requests, memory=memory, progress=progress)

    monkeypatch.setattr(Editor, "compute", spy)
    submit(ws, GOOD[:3])
    apply(ws, corpus, batch_size=1, editor="emmet")
    submit(ws, GOOD[3:4])
    apply(ws, corpus, batch_size=1, editor="alphaedit")
    assert seen[:3] == [("emmet", None)] * 3 and seen[3] == ("alphaedit", 3)
