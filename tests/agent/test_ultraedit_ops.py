"""UltraEdit through the ledger: its lifelong statistics are stored with each operation (same
transaction), loaded before the next batch, subtracted by undo, re-added by redo, rebuilt in
order by replay; float64 throughout (editors.lifelong_norm), on the editable tiny model."""
import pytest
import torch
from sqlalchemy import func, select

from knowledger.agent import config as aconfig
from knowledger.agent import lifelong as alife
from knowledger.agent import operations as ops
from knowledger.agent.errors import KnowledgerError
from knowledger.agent.scheduler import EDITORS, LIFELONG_EDITORS, EditSettings, History, choose_editor
from knowledger.agent.workspace import open_workspace
from knowledger.editors.lifelong_norm import BatchMoments, LifelongStats
from knowledger.editors.requests import EditRequest
from knowledger.editors.ultraedit import UltraEditHParams, UltraEditor
from knowledger.ledger import repository as repo
from knowledger.ledger.models import Operation, UltraEditStats
from tests.agent.helpers import GOOD, OVERRIDES, data, submit

# strong enough for the tiny model's facts to become top-1 (η 1e-4 of the real preset is not)
ULTRA = dict(OVERRIDES, ultraedit_layers=[1, 2, 3], ultraedit_lr=0.1)
LAYERS = (1, 2, 3)


def apply(db, facts, **kw):
    for f in facts:
        submit(db, *f)
    with open_workspace(db) as w:
        return data(ops.apply_pending(w, editor="ultraedit", overrides=kw.pop("overrides", ULTRA),
                                      audit="never", **kw))


def ledger(db):
    """(stored latest state (seq, LifelongStats) or None, {seq: batch moments} of the active
    operations, rows in ultraedit_stats, head seq)."""
    with open_workspace(db) as w, w.reading() as s:
        base = repo.current_base_model(s)
        latest = repo.latest_lifelong_state(s, base.id)
        state = None if latest is None else (latest[0], LifelongStats(alife.from_stored(latest[1])))
        batches = dict(alife.batches(s, base.id))
        want: dict[int, int] = {}  # what load's one aggregate query must count
        for b in batches.values():
            for l, m in b.layers.items():
                want[l] = want.get(l, 0) + m.n
        assert repo.active_batch_counts(s, base.id) == {l: n for l, n in want.items() if n}
        n_rows = repo.count_lifelong_rows(s)
        head = repo.head_operation(s, base.id)
        return state, batches, n_rows, head.seq if head else 0


def assert_same(a: LifelongStats, b: LifelongStats):
    la = {l: m for l, m in a.layers.items() if m.n}
    lb = {l: m for l, m in b.layers.items() if m.n}
    assert set(la) == set(lb)
    for l in la:
        assert la[l].n == lb[l].n
        torch.testing.assert_close(la[l].mean, lb[l].mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(la[l].m2, lb[l].m2, rtol=1e-10, atol=1e-9)


def fresh_moments(tiny_dir, facts, deltas=()) -> BatchMoments:
    """The batch moments of `facts`, recomputed outside the ledger with a fresh editor on the
    tiny model (plus `deltas`, a list of factor pairs per layer, if given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ed = UltraEditor(model, tok, UltraEditHParams(layers=LAYERS, lr=ULTRA["ultraedit_lr"]))
    K, G, _, _ = ed.gradients([EditRequest(p, s, t) for p, s, t in facts])
    return BatchMoments.of({l: torch.cat([K[l], G[l]], 1) for l in LAYERS})


def test_statistics_after_apply_apply_undo_replay_equal_the_rebuild_from_the_surviving_history(ws, tiny_dir):
    first = apply(ws, GOOD[:4], batch_size=4)  # one of the four fails: the retry's three are applied
    assert [o["status"] for o in first["operations"]] == ["committed"]
    kept = [GOOD[i - 1] for i in first["operations"][0]["applied"]]  # fact ids 1.. = GOOD[0..]
    assert len(kept) == 3
    state, batches, n_rows, head = ledger(ws)
    assert state[0] == head == 1 and set(batches) == {1}
    assert n_rows == 2 * len(LAYERS)  # a batch row and a state row per layer
    # the recorded moments are those of the applied facts on the base weights, recomputed apart
    assert_same(LifelongStats().update(batches[1]), LifelongStats().update(fresh_moments(tiny_dir, kept)))
    assert_same(state[1], LifelongStats.rebuild([batches[1]]))

    second = apply(ws, GOOD[4:5], batch_size=1)
    assert second["operations"][0]["status"] == "committed"
    state, batches, _, head = ledger(ws)
    assert state[0] == head == 2
    assert_same(state[1], LifelongStats.rebuild([batches[1], batches[2]]))
    with open_workspace(ws) as w, w.reading() as s:  # the second batch was normalised with the first's
        diag = repo.get_operation_by_seq(s, 2).metrics_json["diagnostics"]
    assert diag["lifelong_rows"] == batches[1].layers[1].n + batches[2].layers[1].n
    assert diag["preset_measured"] is False  # the tiny llama has no measured preset

    with open_workspace(ws) as w:
        ops.undo(w, seq=2)
    state, batches, _, head = ledger(ws)
    assert state[0] == head == 3 and set(batches) == {1}
    assert_same(state[1], LifelongStats.rebuild([batches[1]]))  # subtracted, to float64 rounding
    assert state[1].layers[1].n == batches[1].layers[1].n

    third = apply(ws, GOOD[5:6], batch_size=1)  # loaded from the ledger before this batch
    assert third["operations"][0]["status"] == "committed"
    state, batches, _, _ = ledger(ws)
    assert_same(state[1], LifelongStats.rebuild([batches[1], batches[4]]))
    with open_workspace(ws) as w, w.reading() as s:
        diag = repo.get_operation_by_seq(s, 4).metrics_json["diagnostics"]
    assert diag["lifelong_rows"] == batches[1].layers[1].n + batches[4].layers[1].n

    with open_workspace(ws) as w:
        assert data(ops.replay(w))["mismatches"] == []
        rec = data(ops.replay_recompute(w))  # a new lineage: rebuilt batch by batch, in order
    assert [o["status"] for o in rec["operations"]] == ["committed", "committed"]
    replayed, batches, _, head = ledger(ws)
    assert sorted(batches) == [5, 6] and replayed[0] == head == 6
    assert_same(replayed[1], LifelongStats.rebuild([batches[5], batches[6]]))
    # the same surviving batches on the same weights: the statistics the undo left, plus the third
    assert_same(replayed[1], state[1])
    assert_same(LifelongStats().update(batches[5]), LifelongStats().update(fresh_moments(tiny_dir, kept)))
    with open_workspace(ws) as w:
        assert data(ops.replay(w))["mismatches"] == []


def test_a_failed_apply_leaves_the_stored_statistics_unchanged(ws, monkeypatch):
    apply(ws, GOOD[:4], batch_size=4)
    before = ledger(ws)
    # 1. every fact fails (η far too small to make them top-1): a failed operation, no statistics
    weak = apply(ws, GOOD[4:5], batch_size=1, overrides=dict(ULTRA, ultraedit_lr=1e-6))
    assert [o["status"] for o in weak["operations"]] == ["failed"]
    after = ledger(ws)
    assert after[0][0] == before[0][0] and after[2] == before[2]
    assert_same(after[0][1], before[0][1])

    # 2. an error inside the commit, after the operation row and its batch rows were written:
    # the one transaction rolls back, nothing of the operation is left
    real = repo.save_lifelong

    def failing(s, operation_id, base_model_id, role, moments):
        real(s, operation_id, base_model_id, role, moments)
        if role == repo.STATE:
            raise RuntimeError("disk full")

    with open_workspace(ws) as w, w.reading() as s:
        n_ops = s.scalar(select(func.count()).select_from(Operation))
    submit(ws, *GOOD[5])
    monkeypatch.setattr(repo, "save_lifelong", failing)
    with open_workspace(ws) as w:
        with pytest.raises(RuntimeError, match="disk full"):
            ops.apply_pending(w, editor="ultraedit", overrides=ULTRA, audit="never")
    monkeypatch.setattr(repo, "save_lifelong", real)
    with open_workspace(ws) as w, w.reading() as s:
        assert s.scalar(select(func.count()).select_from(Operation)) == n_ops
        assert s.scalar(select(func.count()).select_from(UltraEditStats)) == before[2]
    again = ledger(ws)
    assert_same(again[0][1], before[0][1])
    ok = apply(ws, [], batch_size=1)  # the pending fact, now with the stored statistics
    assert ok["operations"][0]["status"] == "committed"
    state, batches, _, _ = ledger(ws)
    assert_same(state[1], LifelongStats.rebuild(batches[k] for k in sorted(batches)))


def test_undo_redo_round_trip(ws):
    apply(ws, GOOD[:4], batch_size=4)
    apply(ws, GOOD[4:5], batch_size=1)
    from knowledger.agent.consolidate import consolidate_workspace

    with open_workspace(ws) as w:  # consolidation re-solves closed-form edits only
        with pytest.raises(KnowledgerError, match="operation seq 1 was made by ultraedit"):
            consolidate_workspace(w)
    both, batches, _, _ = ledger(ws)
    b1 = batches[1]
    with open_workspace(ws) as w:
        ops.undo(w, seq=1)
    state, batches, _, _ = ledger(ws)
    assert_same(state[1], LifelongStats.rebuild([batches[2]]))
    with open_workspace(ws) as w:
        ops.redo(w, seq=1)  # reused deltas: the same moments come back
    state, batches, _, head = ledger(ws)
    assert sorted(batches) == [2, 4] and state[0] == head == 4
    for l in LAYERS:  # the redo recorded exactly the redone operation's moments
        assert batches[4].layers[l].n == b1.layers[l].n
        assert torch.equal(batches[4].layers[l].mean, b1.layers[l].mean)
        assert torch.equal(batches[4].layers[l].m2, b1.layers[l].m2)
    assert_same(state[1], both[1])  # back where it was (merge order differs only by rounding)
    with open_workspace(ws) as w:
        ops.undo(w, seq=2)
        ops.undo(w, seq=4)
    state, batches, _, _ = ledger(ws)
    assert batches == {} and all(m.n == 0 for m in state[1].layers.values())
    with open_workspace(ws) as w:
        assert data(ops.replay(w))["mismatches"] == []


def test_replay_reports_stored_statistics_that_differ_from_their_rebuild(ws):
    apply(ws, GOOD[:4], batch_size=4)
    with open_workspace(ws) as w, w.writing() as s:  # a state that is not the sum of the batches
        row = s.scalars(select(UltraEditStats).where(UltraEditStats.role == repo.STATE,
                                                     UltraEditStats.layer == 2)).one()
        state = alife.from_stored([repo.operation_lifelong(s, row.operation_id, repo.STATE)[1]])[2]
        s.delete(row)
        s.flush()
        bad = repo.StoredMoments(2, state.n, state.mean.numpy() + 1.0, state.m2.numpy())
        repo.save_lifelong(s, row.operation_id, row.base_model_id, repo.STATE, [bad])
    with open_workspace(ws) as w:
        mismatches = data(ops.replay(w))["mismatches"]
    assert mismatches == ["ultraedit statistics after operation seq 1, layer 2: stored mean differs from "
                          "the rebuild by 1"]
    with open_workspace(ws) as w, w.writing() as s:  # a damaged row: its checksum says so
        row = s.scalars(select(UltraEditStats).where(UltraEditStats.role == repo.BATCH,
                                                     UltraEditStats.layer == 1)).one()
        row.n += 1
    with open_workspace(ws) as w:
        mismatches = data(ops.replay(w))["mismatches"]
    assert len(mismatches) == 1 and "checksum mismatch" in mismatches[0] and "layer 1" in mismatches[0]


def test_auto_never_picks_ultraedit_and_it_cannot_be_the_lifelong_editor(ws):
    assert "ultraedit" in EDITORS
    settings = [EditSettings(lifelong_min_active=200, lifelong_norm_growth=0.3, lifelong_editor=e,
                             malmen_min_batch=m, malmen_hypernet="ab" * 32 if m else None)
                for e in LIFELONG_EDITORS for m in (0, 100)]
    picked = {choose_editor(n, "auto", 256, History(active, growth), st)[0] for st in settings
              for n in (1, 16, 256, 5000) for active in (0, 199, 200, 10**6) for growth in (0.0, 0.29, 0.3, 5.0)}
    assert picked == {"emmet", "memit", "alphaedit", "encore", "malmen"}  # every rule ran; none is ultraedit
    assert choose_editor(3, "ultraedit", 256)[0] == "ultraedit"
    with open_workspace(ws) as w:
        with pytest.raises((KnowledgerError, ValueError), match="lifelong_editor"):
            aconfig.set_value(w, "lifelong_editor", "ultraedit")


def test_ultraedit_hparams_are_checked_and_recorded_as_they_ran(ws):
    submit(ws, *GOOD[0])
    with open_workspace(ws) as w:
        with pytest.raises(ValueError, match="ultraedit_lr must be a finite number ≥ 0"):
            ops.apply_pending(w, editor="ultraedit", overrides=dict(ultraedit_lr=-1.0))
    with open_workspace(ws) as w:
        with pytest.raises(KnowledgerError, match=r"ultraedit: ultraedit layers \(1, 9\) out of range for 4 layers"):
            ops.apply_pending(w, editor="ultraedit", overrides=dict(ULTRA, ultraedit_layers=[1, 9]), audit="never")
    got = apply(ws, [], batch_size=1, overrides=dict(ULTRA, ultraedit_layers=[], ultraedit_lr=0.05))
    # (committed or not: an operation records what it was computed with either way)
    with open_workspace(ws) as w, w.reading() as s:
        op = repo.get_operation_by_seq(s, got["operations"][0]["seq"])
        hp = op.hparams_json
        assert op.editor == "ultraedit" and op.distribution is None
        assert op.metrics_json["stats"] is None  # no key statistics
    # [] took the family's (generic) preset: the last fifth of the layers but one; recorded as run
    assert hp["ultraedit_layers"] == [2] and hp["ultraedit_lr"] == 0.05 and hp["ultraedit_ridge"] == 1.0
