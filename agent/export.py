"""Reading the live model: ask it a prompt, or export it as a Hugging Face folder with a model card.

Both open the live model read-only (agent.live.open_live). A stale or corrupt snapshot is rebuilt
in memory; it is also rewritten when no other command holds the workspace lock at that moment.

The export is atomic: the folder is written into a temporary directory beside the destination
and renamed into place. It holds the model (safetensors + config) in the dtype the base checkpoint
is stored in (export_dtype), the tokenizer, a README.md model card (agent.model_card: huggingface_hub
metadata, the operations and their hyperparameters, the active facts, the last audit and health),
and knowledger-export.json (base model, head seq, weights hash, dtype, the edited parameters, the
active facts) for scripts: with it the knowledger weights hash of an exported float32 folder can be
recomputed (agent.live.state_hash; a bfloat16/float16 export holds the live weights cast to that
dtype). It loads with `AutoModelForCausalLM.from_pretrained`. With `adapter=True` the folder is a
PEFT LoRA adapter of the active deltas instead (agent.adapter), for `PeftModel.from_pretrained`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knowledger.agent.adapter import PEFT_MISSING, write_adapter
from knowledger.agent.live import (LiveModel, lock_path, open_live, remove_stale_temporaries,
                                   snapshot_path)
from knowledger.agent.lock import try_lock
from knowledger.agent.jsonutil import iso
from knowledger.agent.model_card import CardInputs, card_text, hub_base_model, read_card_inputs
from knowledger.agent.workspace import Workspace
from knowledger.editors.fileio import atomic_dir
from knowledger.editors.evaluate import top_tokens
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import KnowledgerError


def write_hf_folder(model, tokenizer, out: str | os.PathLike, extra: dict[str, str] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """A Hugging Face folder (safetensors + config + tokenizer + `extra` text files by name),
    written into a temp dir beside `out` and renamed; `out` must not exist or be an empty dir.
    dtype: the weights' dtype in the folder (None: the model's); another dtype is written from a
    cast copy (the model itself is not touched; the copy costs its size in memory)."""
    out = Path(out).expanduser().absolute()
    remove_killed_exports(out)
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)  # deepcopy keeps tied weights tied
        model.config.dtype = dtype
    with atomic_dir(out) as tmp:  # folders 0755, files 0644; a symlink at `out` is refused
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def remove_killed_exports(out: Path) -> int:
    """Remove the temporary folders (`.<name>.<8 random chars>`) that a killed write of `out` left
    beside it (atomic_dir cleans up after an error, but nothing runs after a SIGKILL)."""
    n = 0
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}")
    for p in out.parent.glob(f".{out.name}.*") if out.parent.is_dir() else ():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def open_for_reading(ws: Workspace, what: str) -> tuple[LiveModel, int, list[str]]:
    """The live model and head seq; notes say whether the snapshot was rebuilt."""
    notes: list[str] = []
    lock = try_lock(lock_path(ws.location), what)
    try:
        if lock is not None:
            remove_stale_temporaries(snapshot_path(ws.location))
        live, head = open_live(ws, refresh=lock is not None, notes=notes)
    finally:
        if lock is not None:
            lock.release()
    return live, head, notes


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of a prompt (new text only)."""
    enc = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def ask(ws: Workspace, prompt: str, *, top_k: int = 5, max_new_tokens: int = 20) -> dict:
    """The live model's top next tokens for `prompt` and a short greedy continuation."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    live, head, notes = open_for_reading(ws, "ask")
    top = top_tokens(live.model, live.tokenizer, prompt, top_k)
    return dict(prompt=prompt, top=[dict(token=t, p=p) for t, p in top],
                continuation=greedy(live.model, live.tokenizer, prompt, max_new_tokens),
                head_seq=head, weights_sha256=live.state_hash, notes=notes)


# --- export -----------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
EXPORT_DTYPES = ("auto", *_DTYPES)


def stored_dtype(folder: Path) -> str | None:
    """The floating dtype most of a Hugging Face folder's safetensors weights are stored in (by
    element count; headers only), None when the folder has none."""
    counts: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__" and t.get("dtype") in _ST_DTYPES:
                numel = 1
                for d in t.get("shape", ()):
                    numel *= int(d)
                counts[_ST_DTYPES[t["dtype"]]] = counts.get(_ST_DTYPES[t["dtype"]], 0) + numel
    return max(counts, key=counts.get) if counts else None


def export_dtype(name_or_path: str, live_dtype: torch.dtype, asked: str = "auto") -> str:
    """The dtype an export writes: `asked`, or for "auto" the dtype the base checkpoint is stored
    in (the live model is loaded in float32 whatever the checkpoint; its edited weights are cast
    back). The default model's checkpoint is the float32 folder converted from its GGUF file (the
    exact dequantised values): "auto" keeps float32 there; `bfloat16` halves it with a cast."""
    if asked not in EXPORT_DTYPES:
        raise KnowledgerError(f"unknown export dtype {asked!r} (one of {', '.join(EXPORT_DTYPES)})")
    if asked != "auto":
        return asked
    from knowledger.editors.models import resolve_model

    try:
        found = stored_dtype(resolve_model(name_or_path))
    except OSError:
        found = None
    return found or str(live_dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ExportResult:
    """`export`: what was written where. kind is "model" (a Hugging Face model folder) or
    "adapter" (a PEFT LoRA adapter of the active deltas); adapter lists its modules and ranks."""

    path: str
    kind: str
    head_seq: int
    weights_sha256: str
    dtype: str
    base_model: str
    facts: list[dict]
    adapter: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _card_inputs(ws: Workspace, head: int, state: str, dtype: str) -> tuple[CardInputs, dict]:
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError("the workspace has no base model: run `knowledger init`")
        facts = [dict(id=req.id, seq=op.seq, editor=op.editor, text=req.prompt.format(req.subject),
                      target_new=req.target_new, target_true=req.target_true,
                      applied_at=iso(op.finished_at)) for op, req in repo.active_facts(s, base.id)]
        ops, audit = read_card_inputs(s, base)
        info = dict(name_or_path=base.name_or_path, weights_sha256=base.weights_sha256)
    return CardInputs(base=info, facts=facts, operations=ops, audit=audit, head_seq=head,
                      weights_sha256=state, dtype=dtype), info


def export(ws: Workspace, out: str | os.PathLike, *, adapter: bool = False, dtype: str = "auto") -> ExportResult:
    """Write the live model to `out` (must not exist, or be an empty directory), atomically: a
    Hugging Face model folder in the base checkpoint's dtype (`dtype` to choose another), or with
    adapter=True the active deltas as a PEFT LoRA adapter (agent.adapter). Both with a model card."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KnowledgerError(f"{out} exists and is not an empty directory")
    if adapter:
        try:
            import peft  # noqa: F401 (fail before loading anything)
        except ImportError:
            raise KnowledgerError(PEFT_MISSING) from None
    live, head, notes = open_for_reading(ws, "export")
    live_dtype = next(live.model.parameters()).dtype
    with ws.reading() as s:
        name = repo.current_base_model(s).name_or_path
    kept = "float32" if adapter else export_dtype(name, live_dtype, dtype)
    inputs, base = _card_inputs(ws, head, live.state_hash, kept)
    info = dict(base_model=base, head_seq=head, weights_sha256=live.state_hash, dtype=kept,
                edited_params=sorted(live.param_shas), facts=inputs.facts)
    remove_killed_exports(out)
    modules: list[dict] = []
    if adapter:
        with atomic_dir(out) as tmp:
            written = write_adapter(tmp, live.active, base_model=hub_base_model(name),
                                    conv1d=live.lm.spec.orientation == "conv1d")
            modules = [dataclasses.asdict(m) for m in written]
            info["adapter"] = modules
            (tmp / "README.md").write_text(card_text(dataclasses.replace(inputs, adapter=modules), adapter=True),
                                           encoding="utf-8")
            (tmp / "knowledger-export.json").write_text(json.dumps(info, indent=1, ensure_ascii=False),
                                                        encoding="utf-8")
    else:
        write_hf_folder(live.model, live.tokenizer, out, dtype=_DTYPES[kept], extra={
            "README.md": card_text(inputs, adapter=False),
            "knowledger-export.json": json.dumps(info, indent=1, ensure_ascii=False)})
    return ExportResult(path=str(out), kind="adapter" if adapter else "model", head_seq=head,
                        weights_sha256=live.state_hash, dtype=kept, base_model=name, facts=inputs.facts,
                        adapter=modules, notes=notes)
