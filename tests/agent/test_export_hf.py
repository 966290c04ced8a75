"""Hugging Face–native export: the base dtype kept, the model card's metadata, the PEFT adapter."""
import json
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from knowledger.agent.audit import audit
from knowledger.agent.export import export
from knowledger.agent.live import ActiveDelta, factors_from_delta, open_live, stored_delta
from knowledger.agent.records import OpRecord
from knowledger.agent.session import session
from knowledger.agent.workspace import init_workspace, open_workspace
from knowledger.editors.result import LayerDelta
from knowledger.ledger.errors import KnowledgerError
from knowledger.ledger.models import OperationKind
from tests.agent.helpers import GOOD, apply, call, submit, tokenizer
from tests.tiny import tiny_config

IDS = torch.tensor([[5, 17, 33, 2, 60, 71, 9, 100, 44, 3]])  # (1, 10) any token ids of the 128-token vocab


def save_tiny_as(path, family="llama", dtype=torch.float32, seed=0):
    """The editable tiny model (tests.agent.helpers) of a family, stored in `dtype`."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.vocab_size, config.initializer_range = 128, 0.2
    AutoModelForCausalLM.from_config(config).eval().to(dtype).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def workspace_on(tmp_path, model_dir):
    db = tmp_path / "ws"
    init_workspace(db, str(model_dir)).workspace.close()
    return db


def record_deltas(db, deltas: list[LayerDelta]) -> None:
    """Commit one apply operation carrying `deltas` (stored as the ledger stores them)."""
    with open_workspace(db) as w, session(w, what="test") as es:
        live = es.live
        ds = [stored_delta(d) for d in deltas]
        before, seq = live.state_hash, es.take_seq()
        live.set_active(live.active + [ActiveDelta(seq, -1, d) for d in ds])
        es.commit([OpRecord(seq=seq, kind=OperationKind.apply, base_model_id=live.base_model_id,
                            deltas=[factors_from_delta(d) for d in ds], before=before, after=live.state_hash)])


def random_delta(param, layer, d_out, d_in, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return LayerDelta(layer, param, 0.05 * torch.randn(d_out, rank, generator=g),  # (d_out, r)
                      torch.randn(d_in, rank, generator=g))  # (d_in, r)


@torch.no_grad()
def live_logits(db):
    with open_workspace(db) as w:
        live, _ = open_live(w, refresh=False)
        return live.model(IDS).logits, {n: p.detach().clone() for n, p in live.model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_keeps_the_base_checkpoints_dtype(tmp_path, corpus, dtype):
    model_dir = save_tiny_as(tmp_path / "tiny", dtype=dtype)
    db = workspace_on(tmp_path, model_dir)
    submit(db, *GOOD[0])
    assert apply(db, corpus)["operations"][0]["applied"] == [1]
    _, live = live_logits(db)
    assert {p.dtype for p in live.values()} == {torch.float32}  # edited in float32 ...
    report = call(export, db, out=tmp_path / "out")
    name = str(dtype).removeprefix("torch.")
    assert report["dtype"] == name and report["kind"] == "model"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == name
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:  # ... stored in the base's dtype
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in stored.values()} == {dtype}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    edited = "model.layers.1.mlp.down_proj.weight"
    assert edited in json.loads((tmp_path / "out" / "knowledger-export.json").read_text())["edited_params"]
    for n, p in reloaded.named_parameters():  # the live weights, cast: bit for bit
        assert torch.equal(p, live[n].to(dtype)), n
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    assert not torch.equal(base.get_parameter(edited), reloaded.get_parameter(edited))
    unedited = "model.layers.0.mlp.down_proj.weight"  # base → float32 → base dtype is exact
    assert torch.equal(base.get_parameter(unedited), reloaded.get_parameter(unedited))
    asked = call(export, db, out=tmp_path / "out32", dtype="float32")
    assert asked["dtype"] == "float32"
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out32").get_parameter(edited), live[edited])


def test_the_model_card_metadata_parses_back(tmp_path, ws, corpus, tiny_dir):
    from huggingface_hub import ModelCard

    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    call(export, ws, out=tmp_path / "before-audit")
    card = ModelCard.load(tmp_path / "before-audit" / "README.md")
    assert card.data.knowledger["last_audit"] is None and "No audit recorded" in card.text
    checked = call(audit, ws)
    report = call(export, ws, out=tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == str(tiny_dir) and card.data.library_name == "transformers"
    assert {"knowledger", "model-editing", "emmet"} <= set(card.data.tags)
    k = card.data.knowledger
    assert k["editors"] == ["emmet"] and k["active_facts"] == 2 and k["head_seq"] == report["head_seq"]
    assert k["last_audit"] == dict(run=checked["runs"][0]["audit_run_id"], head_seq=report["head_seq"],
                                   healthy=checked["healthy"], drifted=0, current=True)
    assert "| #1 | Home of Bob | Rome | - | 1 | emmet |" in card.text
    assert '"v_steps": 10' in card.text and "layers [1, 2]" in card.text  # the operation's hyperparameters
    assert "‖W − W_base‖ / ‖W_base‖" in card.text and "model.layers.1.mlp.down_proj.weight" in card.text


def check_adapter(tmp_path, db, model_dir):
    from peft import PeftModel

    report = call(export, db, out=tmp_path / "adapter", adapter=True)
    assert report["kind"] == "adapter"
    edited, _ = live_logits(db)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(IDS).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(IDS).logits
    assert (plain - edited).abs().max() > 1e-2  # the edits change the logits ...
    torch.testing.assert_close(adapted, edited, atol=1e-4, rtol=0)  # ... and the adapter reproduces them
    return report


def test_adapter_reproduces_the_edited_llama_and_compresses_a_large_rank(tmp_path, ws, corpus, tiny_dir):
    submit(ws, *GOOD[0]), submit(ws, *GOOD[1])
    apply(ws, corpus)
    submit(ws, *GOOD[2])
    apply(ws, corpus)
    # rank 40 on top of the facts' on layer 2 (d_out 32, d_in 96): more than min(d_out, d_in) = 32
    record_deltas(ws, [random_delta("model.layers.2.mlp.down_proj.weight", 2, 32, 96, 40, seed=1)])
    report = check_adapter(tmp_path, ws, tiny_dir)
    mods = {m["module"]: m for m in report["adapter"]}
    assert mods["model.layers.1.mlp.down_proj"]["total_rank"] == mods["model.layers.1.mlp.down_proj"]["rank"] == 3
    assert mods["model.layers.2.mlp.down_proj"]["total_rank"] == 43 and mods["model.layers.2.mlp.down_proj"]["rank"] == 32
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["fan_in_fan_out"]
    assert config["r"] == config["lora_alpha"] == 32
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 3}


def test_adapter_reproduces_an_edited_gpt2_conv1d(tmp_path):
    model_dir = save_tiny_as(tmp_path / "gpt2", family="gpt2")
    db = workspace_on(tmp_path, model_dir)
    # GPT-2's c_proj is a Conv1D, weight (d_in 128, d_out 32); the deltas are in the math orientation
    record_deltas(db, [random_delta("transformer.h.1.mlp.c_proj.weight", 1, 32, 128, 3, seed=2),
                       random_delta("transformer.h.2.mlp.c_proj.weight", 2, 32, 128, 2, seed=3)])
    record_deltas(db, [random_delta("transformer.h.1.mlp.c_proj.weight", 1, 32, 128, 4, seed=4)])
    report = check_adapter(tmp_path, db, model_dir)
    assert [(m["module"], m["rank"]) for m in report["adapter"]] == [("transformer.h.1.mlp.c_proj", 7),
                                                                     ("transformer.h.2.mlp.c_proj", 2)]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_adapter_without_peft_or_without_edits_is_one_line(tmp_path, ws, monkeypatch):
    with pytest.raises(KnowledgerError, match="no active edits"):
        call(export, ws, out=tmp_path / "a", adapter=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(KnowledgerError, match=r'^export --adapter needs peft: pip install "knowledger\[peft\]"$'):
        call(export, ws, out=tmp_path / "b", adapter=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
