"""Direct editing without the ledger: load a model, gather key statistics, edit, evaluate, save.

This is what `knowledger edit` and `knowledger bench` stand on; the scheduler (agent.scheduler)
adds the ledger around the same calls.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knowledger.editors.apply import apply_deltas
from knowledger.editors.editor import Editor
from knowledger.editors.fileio import atomic_dir
from knowledger.editors.hparams import EditHParams, load_preset, preset_for
from knowledger.editors.model_spec import ModelSpec, spec_for
from knowledger.editors.models import load_model, weights_sha256


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    weights_sha256: str
    load_s: float = 0.0
    stats: dict[int, torch.Tensor] = field(default_factory=dict)
    stats_s: float = 0.0


def open_model(name_or_path: str | None = None) -> LoadedModel:
    t = time.perf_counter()
    model, tokenizer = load_model(name_or_path)
    spec = spec_for(model)
    sha = weights_sha256(model)
    return LoadedModel(name=name_or_path or "default", model=model, tokenizer=tokenizer, spec=spec,
                       weights_sha256=sha, load_s=time.perf_counter() - t)


def resolve_hparams(lm: LoadedModel, preset: str | None = None, overrides: dict | None = None) -> EditHParams:
    hp = load_preset(preset) if preset else preset_for(lm.model)
    return hp.replace(**overrides) if overrides else hp


def ensure_stats(lm: LoadedModel, hp: EditHParams, corpus: str | Path | None, *,
                 progress: bool = True) -> dict[int, torch.Tensor]:
    """Second moments of the keys for hp.layers: from the cache, or one pass over the corpus.

    With no corpus, text sampled from the model itself (cached) stands in for one.
    """
    from knowledger.editors.stats import second_moments

    need = [l for l in hp.layers if l not in lm.stats]
    if not need:
        return lm.stats
    t = time.perf_counter()
    got = second_moments(lm.model, lm.tokenizer, need, corpus, hp.stats_tokens, dtype=hp.stats_dtype,
                         weights_sha=lm.weights_sha256, progress=progress)
    lm.stats.update(got)
    lm.stats_s += time.perf_counter() - t
    return lm.stats


def make_editor(lm: LoadedModel, method: str, hp: EditHParams, corpus=None, *, progress=True,
                hypernet: str | os.PathLike | None = None):
    """An editor for `method`; MALMEN's comes from a trained hyper-network folder and needs no
    key statistics, the others' from the statistics (computed or cached)."""
    if method == "malmen":
        from knowledger.editors.malmen import MalmenEditor, load_hypernet

        if not hypernet:
            raise ValueError("the malmen editor needs --hypernet DIR (a folder made by `knowledger train-malmen`)")
        net, sha = load_hypernet(hypernet)
        return MalmenEditor(lm.model, lm.tokenizer, net, sha=sha)
    stats = ensure_stats(lm, hp, corpus, progress=progress)
    return Editor(lm.model, lm.tokenizer, hp, method=method, second_moments=stats,
                  weights_sha=lm.weights_sha256)


def apply_result(lm: LoadedModel, result) -> dict[str, str]:
    return apply_deltas(lm.model, lm.spec, result.deltas)


def save_model(lm: LoadedModel, out: Path) -> Path:
    """Write the loaded model as a Hugging Face folder, atomically (see write_hf_folder)."""
    return write_hf_folder(lm.model, lm.tokenizer, out)


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


def requests_from_facts(facts) -> list:
    """ledger.facts.Fact objects -> editor requests."""
    from knowledger.editors.requests import EditRequest

    return [EditRequest(prompt=f.prompt, subject=f.subject, target_new=f.target_new,
                        target_true=f.target_true, paraphrases=tuple(f.paraphrases),
                        neighborhood=tuple((p, a) for p, a in f.neighborhood)) for f in facts]


def direct_edit(lm: LoadedModel, requests: list, *, method: str, hp: EditHParams, corpus=None,
                progress: bool = True, top_k: int = 3, hypernet=None) -> dict:
    """Edit the loaded model in place (no ledger) and report before/after top tokens per prompt.

    ROME edits one fact at a time, so several facts are applied one after another.
    """
    from knowledger.editors.evaluate import fact_metrics, top_tokens

    def probe():
        return [{p: top_tokens(lm.model, lm.tokenizer, p, top_k) for p in (r.text, *r.paraphrases,
                                                                           *(q for q, _ in r.neighborhood))}
                for r in requests]

    editor = make_editor(lm, method, hp, corpus, progress=progress, hypernet=hypernet)
    before = probe()
    groups = [[r] for r in requests] if method == "rome" else [requests]
    timings: dict[str, float] = {}
    value_stats = []
    for group in groups:
        res = editor.compute(group)
        apply_result(lm, res)
        value_stats += res.value_stats
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    after = probe()
    metrics = fact_metrics(lm.model, lm.tokenizer, requests)
    return {"editor": method, "layers": list(editor.layers), "stats_s": lm.stats_s, "timings": timings,
            "facts": [{"prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
                       "before": b, "after": a, "metrics": m, "v_star": s}
                      for r, b, a, m, s in zip(requests, before, after, metrics,
                                               value_stats or [None] * len(requests))]}
