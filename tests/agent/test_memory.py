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
    """What a command loads (the stored snapshot + the operations since) equals a rebuild from the
    active operations' keys; returns the snapshot's seq and the head."""
    with open_workspace(db) as w, w.reading() as s:
        base = repo.current_base_model(s)
        head = repo.head_operation(s, base.id).seq
        loaded, rebuilt_flag = amem.load(s, base.id, head)
        rebuilt, since = amem.rebuild(s, base.id), repo.memory_as_of(s, base.id)
    assert not rebuilt_flag and since is not None and since <= head
    assert set(loaded.sums) == {1, 2}
    for layer, M in loaded.sums.items():
        assert loaded.counts[layer] == rebuilt.counts.get(layer, 0) == n_keys
        torch.testing.assert_close(M, rebuilt.sums.get(layer, torch.zeros_like(M)), atol=1e-9, rtol=1e-9)
    return since, head


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
    since, head = assert_consistent(ws, 5)
    assert since == 1 < head  # one snapshot (the first apply); the later operations are replayed
    stored, _, _ = stored_and_rebuilt(ws)
    assert float(stored[1][0].abs().sum()) > 0


def test_the_memory_is_snapshotted_every_n_operations_not_every_one(ws, corpus, monkeypatch):
    """Between snapshots nothing is written; a load replays the operations since the last one,
    an undo of an operation from before the snapshot included."""
    monkeypatch.setattr(amem, "SNAPSHOT_EVERY", 2)
    writes = []
    real = repo.save_memory
    monkeypatch.setattr(repo, "save_memory", lambda s, b, layers: (writes.append(b), real(s, b, layers)))
    submit(ws, GOOD[:4])
    apply(ws, corpus, batch_size=1, editor="emmet")  # seqs 1-4 in one command: snapshots at 1 and 3
    since, head = assert_consistent(ws, 4)
    assert (since, head, len(writes)) == (3, 4, 2)
    with open_workspace(ws) as w:
        ops.undo(w, seq=2)  # seq 5: from before the snapshot; 5 >= 3 + 2: a new snapshot
    assert assert_consistent(ws, 3) == (5, 5) and len(writes) == 3
    with open_workspace(ws) as w:
        ops.undo(w, seq=1)  # seq 6: replayed on top of the snapshot at 5
    assert assert_consistent(ws, 2) == (5, 6) and len(writes) == 3


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
