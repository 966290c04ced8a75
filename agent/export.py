"""Reading the live model: ask it a prompt, or export it as a Hugging Face folder with a model card.

Both open the live model read-only (agent.live.open_live). A stale or corrupt snapshot is rebuilt
in memory; it is also rewritten when no other command holds the workspace lock at that moment.

The export is atomic: the folder is written into a temporary directory beside the destination
and renamed into place. It holds the model (safetensors + config), the tokenizer, a README.md
model card listing the active edits, and knowledger-export.json (base model, head seq, weights
hash, the edited parameters, the active facts) for scripts: with it the knowledger weights hash
of an exported folder can be recomputed (agent.live.state_hash). It loads with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
import os
import shutil
import re
from pathlib import Path

import torch

from knowledger.agent.live import (LiveModel, lock_path, open_live, remove_stale_temporaries,
                                   snapshot_path)
from knowledger.agent.lock import try_lock
from knowledger.agent.jsonutil import iso
from knowledger.agent.workspace import Workspace
from knowledger.editors.fileio import atomic_dir
from knowledger.editors.evaluate import top_tokens
from knowledger.ledger import repository as repo
from knowledger.ledger.errors import KnowledgerError


def write_hf_folder(model, tokenizer, out: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """A Hugging Face folder (safetensors + config + tokenizer + `extra` text files by name),
    written into a temp dir beside `out` and renamed; `out` must not exist or be an empty dir."""
    out = Path(out).expanduser().absolute()
    remove_killed_exports(out)
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


def active_edits(ws: Workspace) -> tuple[dict, list[dict]]:
    """(the base model, the facts whose edits are in the live weights, in operation order)."""
    with ws.reading() as s:
        base = repo.current_base_model(s)
        if base is None:
            raise KnowledgerError("the workspace has no base model: run `knowledger init`")
        facts = [dict(id=req.id, seq=op.seq, editor=op.editor, text=req.prompt.format(req.subject),
                      target_new=req.target_new, target_true=req.target_true,
                      applied_at=iso(op.finished_at)) for op, req in repo.active_facts(s, base.id)]
        return dict(name_or_path=base.name_or_path, weights_sha256=base.weights_sha256), facts


def model_card(base: dict, facts: list[dict], head_seq: int, weights_sha256: str) -> str:
    lines = [f"# {Path(base['name_or_path']).name}, edited with knowledger", "",
             f"Base model: `{base['name_or_path']}` (weights sha256 `{base['weights_sha256'][:16]}…`).",
             f"Ledger head: operation seq {head_seq}; knowledger weights hash `{weights_sha256[:16]}…`.",
             "", f"## Active edits ({len(facts)})", ""]
    if facts:
        lines += ["| fact | prompt | new answer | was | operation | editor |",
                  "|---:|---|---|---|---:|---|"]
        esc = lambda t: (t or "-").replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += [f"| #{f['id']} | {esc(f['text'])} | {esc(f['target_new'])} | {esc(f['target_true'])} "
                  f"| {f['seq']} | {f['editor']} |" for f in facts]
    else:
        lines.append("None: the weights are the base model's.")
    return "\n".join(lines) + "\n"


def export(ws: Workspace, out: str | os.PathLike) -> dict:
    """Write the live model to `out` (must not exist, or be an empty directory), atomically."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KnowledgerError(f"{out} exists and is not an empty directory")
    live, head, notes = open_for_reading(ws, "export")
    base, facts = active_edits(ws)
    info = dict(base_model=base, head_seq=head, weights_sha256=live.state_hash,
                edited_params=sorted(live.param_shas), facts=facts)
    write_hf_folder(live.model, live.tokenizer, out, extra={
        "README.md": model_card(base, facts, head, live.state_hash),
        "knowledger-export.json": json.dumps(info, indent=1, ensure_ascii=False)})
    return dict(path=str(out), head_seq=head, weights_sha256=live.state_hash, facts=facts, notes=notes)
