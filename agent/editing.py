"""Direct editing without the ledger: load a model, gather key statistics, edit, evaluate, save.

This is what `knowledger edit` and `knowledger bench` stand on; the scheduler (agent.scheduler)
adds the ledger around the same calls.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knowledger.editors.apply import apply_deltas, apply_from_base, snapshot_params
from knowledger.editors.editor import Editor
from knowledger.editors.hparams import EditHParams, load_preset, preset_for
from knowledger.editors.methods import get_method
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


def open_model(name_or_path: str | None = None, *, device: str | torch.device | None = None) -> LoadedModel:
    """The model on `device` (default: CUDA when present, else the CPU; editors.models)."""
    t = time.perf_counter()
    model, tokenizer = load_model(name_or_path, device=device)
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
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    groups = get_method(method).batches(requests)  # ROME: one fact per batch
    timings: dict[str, float] = {}
    value_stats, applied = [], []
    base = snapshot_params(lm.model, [lm.spec.weight_name(l) for l in editor.layers])
    for group in groups:
        res = editor.compute(group)
        applied += res.deltas  # composed from the base, as the ledger does: same bits as apply + export
        apply_from_base(lm.model, lm.spec, base, applied)
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
