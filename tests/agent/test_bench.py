"""The benchmark as a program: a lifelong run on the tiny editable model, its record and outputs."""
import json

import pytest

from knowledger.agent import bench as B
from knowledger.agent.editing import open_model, resolve_hparams
from knowledger.agent.scheduler import EditSettings
from knowledger.editors.requests import EditRequest
from tests.agent.helpers import CITIES, GOOD, run, save_editable_tiny, write_corpus

HP = dict(layers=[1, 2], v_steps=10, n_context=1, early_stop=False, stats_tokens=1000,
          alphaedit_null_threshold=0.5, encore_alpha=0.1, mom2_weight=100.0)


def facts(n=6):
    return [EditRequest(p, s, t, target_true=CITIES[(i + 1) % len(CITIES)], id=i,
                        neighborhood=((f"Home of Zed{i}", "Paris"),))
            for i, (p, s, t) in enumerate((GOOD * 2)[:n])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return open_model(str(save_editable_tiny(d / "model"))), write_corpus(d / "corpus.txt")


@pytest.mark.parametrize("editor", ["emmet", "alphaedit", "encore"])
def test_sequential_run_records_curves_health_and_restores_the_model(tiny, editor):
    lm, corpus = tiny
    hp = resolve_hparams(lm, None, HP)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rec = B.run(lm, facts(), editor=editor, batch_size=2, hp=hp, corpus=str(corpus),
                curve_points=3, heldout_tokens=256, entropy_prompts=2)
    assert all((v == lm.model.state_dict()[k]).all() for k, v in before.items())  # restored
    assert [p["edits"] for p in rec["curve"]] == [2, 4, 6]
    assert rec["metrics"] == rec["curve"][-1]["metrics"]
    assert rec["metrics"]["efficacy"] > 0.5  # the edits took
    h = rec["health"]
    assert h["perplexity"] > 1 and h["perplexity_base"] > 1 and h["perplexity_ratio"] != 1.0
    assert 0 < h["max_delta_rel"] == rec["curve"][-1]["max_delta_rel"]
    assert set(h["norms"]) == {"1", "2"} and h["generation_entropy"] is not None
    assert [b["editor"] for b in rec["batches"]] == [editor] * 3
    json.dumps(rec)  # JSON-safe


def test_auto_switches_to_the_lifelong_editor_past_the_threshold(tiny):
    lm, corpus = tiny
    hp = resolve_hparams(lm, None, HP)
    st = EditSettings(lifelong_min_active=4, lifelong_norm_growth=10.0)
    rec = B.run(lm, facts(), editor="auto", batch_size=2, hp=hp, corpus=str(corpus),
                heldout_tokens=0, entropy_prompts=0, settings=st)
    assert [b["editor"] for b in rec["batches"]] == ["emmet", "emmet", "encore"]
    assert "lifelong_min_active" in rec["batches"][2]["reason"]
    assert rec["editors_used"] == {"emmet": 2, "encore": 1}
    assert rec["health"]["perplexity"] is None


def test_independent_batches_start_from_the_unedited_model(tiny):
    lm, corpus = tiny
    hp = resolve_hparams(lm, None, HP)
    rec = B.run(lm, facts(4), editor="memit", batch_size=2, hp=hp, corpus=str(corpus),
                sequential=False, heldout_tokens=0, entropy_prompts=0)
    assert rec["curve"] == [] and rec["sequential"] is False
    assert rec["metrics"] == rec["metrics_after_batch"]


def test_cli_bench_writes_json_and_table_writes_markdown_and_pngs(tiny, tmp_path):
    lm, corpus = tiny
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(dict(prompt=p, subject=s, target_new=t, target_true="Paris"))
                              for p, s, t in GOOD[:4]) + "\n")
    sets = [a for kv in HP.items() if kv[0] != "stats_tokens"
            for a in ("--set", f"{kv[0]}={json.dumps(kv[1])}")]
    outs = []
    for editor in ("none", "emmet"):
        out = tmp_path / f"{editor}.json"
        r = run("bench", "counterfact", "--model", lm.name, "--corpus", corpus, "--stats-tokens", 1000,
                *sets, "--data", data, "--n", 4, "--batch-size", 2, "--editor", editor,
                "--heldout-tokens", 128, "--out", out)
        assert r.exit_code == 0, r.output
        outs.append(out)
    rec = json.loads(outs[1].read_text())
    assert rec["command"] and rec["curve"] and rec["dataset"] == "counterfact"
    md, png, curves = tmp_path / "t.md", tmp_path / "m.png", tmp_path / "c.png"
    r = run("bench", "table", *outs, "--md", md, "--png", png, "--curves", curves)
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "none (unedited)" in text and "| emmet |" in text and "ppl ×base" in text
    assert png.stat().st_size > 1000 and curves.stat().st_size > 1000


def test_nas_without_an_anchor_is_measured_once_on_the_clean_model(tiny):
    """`bench counterfact --set nas=true`: the anchor is measured from the pilot facts before the
    first edit (as `knowledger edit` does), never on weights the run has already edited."""
    from knowledger.agent.direct import with_anchor

    lm, corpus = tiny
    out = {}
    for ratio in (0.01, 2.0):
        hp = resolve_hparams(lm, None, {**HP, "nas": True, "nas_max_ratio": ratio})
        rec = B.run(lm, facts(4), editor="emmet", batch_size=2, hp=hp, corpus=str(corpus),
                    curve_points=2, heldout_tokens=0, entropy_prompts=0)
        out[ratio] = rec
    assert out[0.01]["health"]["max_delta_rel"] < 1e-6  # every target above 0.01 × ā: refused
    assert out[2.0]["health"]["max_delta_rel"] > 1e-3 and out[2.0]["metrics"]["efficacy"] > 0.5
    hp = resolve_hparams(lm, None, {**HP, "nas": True})
    with pytest.raises(ValueError, match="before the first edit"):
        with_anchor(lm, "emmet", hp, str(corpus), measured={}, clean=False)
    assert with_anchor(lm, "emmet", hp.replace(nas_anchor=3.0), clean=False).nas_anchor == 3.0
