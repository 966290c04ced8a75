"""The resumable long-run driver (bench/lifelong_long.py): stop + resume == one uninterrupted run."""
import json

import pytest
import torch

from bench.lifelong_long import ResumeMismatch, Stream, run
from knowledger.editors.apply import weight_sha256
from knowledger.editors.ultraedit import UltraEditHParams, UltraEditor
from tests.editors.test_ultraedit import FACTS, TOK
from tests.tiny import tiny_model

CONFIG = dict(editor="ultraedit", batch=2, n=len(FACTS))


def _fresh():
    model = tiny_model("llama", init_range=0.3, n_layers=6)
    return model, Stream("ultraedit", UltraEditor(model, TOK, UltraEditHParams(layers=(2, 3), lr=1e-2)))


def _go(out, stop_after=None):
    model, stream = _fresh()
    progress = run(model, TOK, stream.editor.spec, FACTS, stream, out, CONFIG, checkpoint_every=1,
                   curve_every=4, eval_sample=8, stop_after=stop_after, log=lambda s: None)
    return model, stream, progress


def _sha(model, stream):
    return [weight_sha256(model.get_parameter(stream.editor.spec.weight_name(l))) for l in stream.layers]


def test_a_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    model_a, stream_a, full = _go(tmp_path / "a")
    assert full["batches_done"] == 4 and [p["edits"] for p in full["curve"]] == [4, 8]
    _, _, part = _go(tmp_path / "b", stop_after=1)
    assert part["batches_done"] == 1
    _, _, part = _go(tmp_path / "b", stop_after=2)  # a second working day
    assert part["batches_done"] == 3
    model_b, stream_b, resumed = _go(tmp_path / "b")  # a fresh process from the base weights
    assert resumed["batches_done"] == 4
    assert _sha(model_b, stream_b) == _sha(model_a, stream_a)
    assert [p["metrics"] for p in resumed["curve"]] == [p["metrics"] for p in full["curve"]]
    ta, tb = stream_a.editor.state.to_tensors(), stream_b.editor.state.to_tensors()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert len(list((tmp_path / "b").glob("state-*.safetensors"))) == 1


def test_resume_refuses_a_tampered_state_or_another_config(tmp_path):
    _go(tmp_path, stop_after=1)
    progress = json.loads((tmp_path / "progress.json").read_text())
    state = tmp_path / progress["state"]["file"]
    state.write_bytes(state.read_bytes()[:-1] + b"\0")
    with pytest.raises(ResumeMismatch, match="sha256"):
        _go(tmp_path)
    model, stream = _fresh()
    with pytest.raises(ResumeMismatch, match="config"):
        run(model, TOK, stream.editor.spec, FACTS, stream, tmp_path, dict(CONFIG, batch=3), log=lambda s: None)


def test_the_unedited_row_evaluates_the_same_points_and_changes_nothing(tmp_path):
    model, stream = _fresh()
    before = [weight_sha256(model.get_parameter(stream.editor.spec.weight_name(l))) for l in stream.layers]
    calls = []
    progress = run(model, TOK, stream.editor.spec, FACTS, Stream("none", None), tmp_path, dict(CONFIG, editor="none"),
                   checkpoint_every=1, curve_every=4, eval_sample=8, log=lambda s: None,
                   entropy_fn=lambda m: calls.append(1) or 1.5)
    assert [p["edits"] for p in progress["curve"]] == [4, 8]
    assert all(p["generation_entropy"] == 1.5 for p in progress["curve"]) and len(calls) == 2
    assert _sha(model, stream) == before


def test_the_report_reads_a_partial_run(tmp_path):
    from bench.lifelong_report import load, plot, table

    _go(tmp_path / "run", stop_after=3)  # 3 of 4 batches: partial, one curve point (at 4 edits)
    r = load(tmp_path / "run")
    assert (r["edits_done"], r["n"], [p["edits"] for p in r["curve"]]) == (6, 8, [4])
    assert "6 / 8" in table([r]).splitlines()[2]
    plot([r], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_curve_at_adds_points_and_the_stats_report_reads_them(tmp_path):
    """--curve-at 2 adds a point after the first batch; bench/stats_tokens_seq.py tabulates runs by
    (source, tokens) at the asked edit counts and plots them."""
    from bench.stats_tokens_seq import load, plot, table

    for tokens in (100, 300):
        model, stream = _fresh()
        cfg = dict(CONFIG, hparams=dict(stats_tokens=tokens), corpus="sampled")
        progress = run(model, TOK, stream.editor.spec, FACTS, stream, tmp_path / f"r{tokens}", cfg,
                       checkpoint_every=1, curve_every=8, curve_at=[2], eval_sample=8, log=lambda s: None)
        assert [p["edits"] for p in progress["curve"]] == [2, 8]
    runs = [load(tmp_path / f"r{t}") for t in (300, 100)]
    rows = table(runs, [2, 8]).splitlines()[2:]
    assert [r.split(" | ")[1:4] for r in rows] == [["sampled", "100", "2"], ["sampled", "100", "8"],
                                                    ["sampled", "300", "2"], ["sampled", "300", "8"]]
    plot(runs, [2, 8], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def _ledger_run(tmp_path, out, stop_after=None, consolidate_every=0, kill_after_commit=False):
    """The LedgerStream on the tiny editable model: 3 batches of 2 facts, EMMET through the agent."""
    from bench.lifelong_long import LedgerStream
    from knowledger.agent.editing import open_model
    from knowledger.editors.requests import EditRequest
    from tests.agent.helpers import GOOD, OVERRIDES, STATS_TOKENS, save_editable_tiny, write_corpus

    tiny = tmp_path / "m"
    if not tiny.exists():
        save_editable_tiny(tiny)
        write_corpus(tmp_path / "corpus.txt")
    lm = open_model(str(tiny))
    facts = [EditRequest(prompt=p, subject=s, target_new=t, target_true="Paris" if t != "Paris" else "Rome")
             for p, s, t in GOOD]
    stream = LedgerStream(lm.model, out / "ws", "emmet", (1, 2), batch=2, consolidate_every=consolidate_every,
                          corpus=str(tmp_path / "corpus.txt"), overrides=OVERRIDES, base_model=str(tiny),
                          stats_tokens=STATS_TOKENS)
    config = dict(editor="emmet", batch=2, n=len(facts), ledger=True)
    progress = run(lm.model, lm.tokenizer, lm.spec, facts, stream, out, config, checkpoint_every=1,
                   curve_every=6, eval_sample=6, stop_after=stop_after, log=lambda s: None)
    if kill_after_commit:  # the next batch's apply commits, then the process dies before its checkpoint
        b = progress["batches_done"]
        stream.step(lm.model, facts[b * 2 : (b + 1) * 2])
    return lm, stream, progress


def _ledger_statuses(ws_dir):
    import knowledger
    from knowledger.ledger import repository as repo

    with knowledger.open_workspace(str(ws_dir)) as ws, ws.reading() as s:
        return repo.count_requests_by_status(s), [op.kind.value for op in repo.list_operations(s)]


def test_the_ledger_stream_resumes_from_the_ledger_without_applying_a_batch_twice(tmp_path):
    lm_a, stream_a, full = _ledger_run(tmp_path, tmp_path / "a")
    assert full["batches_done"] == 3 and full["curve"][-1]["edits"] == 6
    statuses, kinds = _ledger_statuses(tmp_path / "a" / "ws")
    assert sum(statuses.values()) == 6 and kinds == ["apply"] * 3
    _ledger_run(tmp_path, tmp_path / "b", stop_after=1, kill_after_commit=True)  # batch 2 committed, no checkpoint
    lm_b, stream_b, resumed = _ledger_run(tmp_path, tmp_path / "b")
    assert resumed["batches_done"] == 3
    statuses_b, kinds_b = _ledger_statuses(tmp_path / "b" / "ws")
    assert statuses_b == statuses and kinds_b == kinds  # no batch submitted or applied twice
    for l in (1, 2):
        name = lm_a.spec.weight_name(l)
        assert weight_sha256(lm_b.model.get_parameter(name)) == weight_sha256(lm_a.model.get_parameter(name))
    assert resumed["curve"][-1]["metrics"] == full["curve"][-1]["metrics"]


def test_the_ledger_stream_consolidates_on_the_workspace_rule(tmp_path):
    _, _, progress = _ledger_run(tmp_path, tmp_path / "c", consolidate_every=4)
    _, kinds = _ledger_statuses(tmp_path / "c" / "ws")
    assert kinds.count("consolidate") == 1 and kinds.count("apply") == 3
    assert [b.get("consolidated") for b in progress["batches"]] == [None, 1.0, None]


def test_a_hyperparameter_added_since_the_run_started_resumes_at_its_default():
    from bench.lifelong_long import same_config

    saved = dict(editor="memit", batch=100, hparams=dict(v_lr=2.0, layers=[3, 4]))
    assert same_config(saved, dict(saved, hparams=dict(saved["hparams"], malmen_lambda="trained")))
    assert not same_config(saved, dict(saved, hparams=dict(saved["hparams"], malmen_lambda="tokens")))
    assert not same_config(saved, dict(saved, hparams=dict(saved["hparams"], no_such_knob=1)))
    assert not same_config(saved, dict(saved, hparams=dict(v_lr=2.0)))  # a key went missing
    assert not same_config(saved, dict(saved, hparams=dict(saved["hparams"], v_lr=1.0)))
    assert not same_config(saved, dict(saved, batch=10))
