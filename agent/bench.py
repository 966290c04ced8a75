"""The CounterFact / zsRE benchmark: edit N facts in batches, sequentially, and measure.

Protocol (lifelong): batches are applied one after another to the same model; metrics are taken
right after each batch (on that batch's facts) and after all N edits (on all of them). The
unedited model's scores on the same facts form the baseline row. Timings per phase; peak RSS.
Outputs: a JSON object (the fields documented in docs/benchmarks.md) and a Markdown table row.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from knowledger.editors.apply import restore_params, snapshot_params
from knowledger.editors.evaluate import aggregate, fact_metrics
from knowledger.editors.requests import EditRequest

from knowledger.agent.direct import apply_result, requests_from_facts, with_anchor
from knowledger.agent.loaded import LoadedModel
from knowledger.agent.recipes import direct_editor
from knowledger.editors.progress import Progress, report

METRICS = ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc", "neighborhood_acc")
ZSRE_METRICS = ("efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc", "efficacy_acc",
                "paraphrase_acc", "neighborhood_acc")


def metric_names(runs: list[dict]) -> tuple[str, ...]:
    return ZSRE_METRICS if runs and runs[0].get("dataset") == "zsre" else METRICS


def load_requests(path: Path, n: int | None = None, offset: int = 0) -> tuple[list[EditRequest], int]:
    """The first n valid facts of a fact file (any layout ledger.facts reads); and how many were skipped."""
    from knowledger.ledger.facts import read_facts

    facts, skipped = [], 0
    for row in read_facts(Path(path)):
        if row.error is not None:
            skipped += 1
            continue
        if offset > 0:
            offset -= 1
            continue
        facts.append(row.fact)
        if n is not None and len(facts) >= n:
            break
    return requests_from_facts(facts), skipped


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def evaluate(lm: LoadedModel, requests: list[EditRequest]) -> dict[str, float]:
    return aggregate(fact_metrics(lm.model, lm.tokenizer, requests))


@dataclass
class Health:
    """Model-health probes shared by the baseline and every run: held-out text and GE prompts."""

    heldout: list[list[int]] | None  # token sequences beyond the statistics' tokens
    prompts: list[str]  # generation-entropy prompts (the first facts' rewrite prompts)
    note: str | None = None

    @classmethod
    def make(cls, lm: LoadedModel, requests: list[EditRequest], hp, corpus, *, heldout_tokens: int,
             entropy_prompts: int) -> "Health":
        from knowledger.editors.corpus import Corpus
        from knowledger.editors.health import heldout_chunks

        chunks, note = None, None
        if heldout_tokens > 0:
            if corpus is None:
                note = "perplexity skipped: the statistics corpus is model-sampled text"
            else:
                chunks = heldout_chunks(Corpus.from_path(corpus), lm.tokenizer, heldout_tokens,
                                        skip_tokens=hp.stats_tokens)
        return cls(chunks, [r.text for r in requests[:entropy_prompts]], note)

    def perplexity(self, lm: LoadedModel) -> float | None:
        from knowledger.editors.health import perplexity

        return perplexity(lm.model, lm.tokenizer, self.heldout) if self.heldout else None

    def entropy(self, lm: LoadedModel) -> float | None:
        from knowledger.editors.health import generation_entropy

        return generation_entropy(lm.model, lm.tokenizer, self.prompts) if self.prompts else None


def _norms(lm: LoadedModel, base: dict[str, torch.Tensor], layers) -> dict[str, dict[str, float]]:
    from knowledger.editors.health import weight_norms

    cur = {l: lm.model.get_parameter(lm.spec.weight_name(l)) for l in layers}
    return {str(l): v for l, v in weight_norms(cur, {l: base[lm.spec.weight_name(l)] for l in layers}).items()}


def checkpoints(n_batches: int, points: int) -> set[int]:
    """Batch indices (1-based) after which all facts so far are evaluated: ~`points` evenly, and the last."""
    step = max(1, math.ceil(n_batches / max(points, 1)))
    return {i for i in range(step, n_batches + 1, step)} | {n_batches}


def run(lm: LoadedModel, requests: list[EditRequest], *, editor: str, batch_size: int, hp,
        corpus=None, progress: Progress | None = None, sequential: bool = True, curve_points: int = 10,
        heldout_tokens: int = 8192, entropy_prompts: int = 32, health: Health | None = None,
        settings=None, log: Callable[[str], None] = lambda s: None, hypernet=None) -> dict:
    """Edit `requests` in consecutive batches; return the run record. The model is restored after.

    sequential (the lifelong protocol): batches pile up on the same weights, a past-edit memory
    (editors.memory) carries every applied batch's keys, and after ~curve_points batches the facts
    edited so far are all re-evaluated, with perplexity on held-out text and the edited layers'
    norm growth: the curves. Not sequential: each batch is edited on the unedited weights.
    editor "auto" picks per batch as the scheduler would (agent.scheduler.choose_editor) given the
    edits applied so far and the current norm growth. hypernet: the folder of a trained MALMEN
    hyper-network, for editor "malmen".
    """
    from knowledger.agent.scheduler import EditSettings, History, choose_editor
    from knowledger.editors.memory import KeyMemory

    settings = settings or EditSettings()
    stats_before = lm.stats_s
    eds: dict[str, object] = {}
    anchors: dict[str, float] = {}  # NAS on without an anchor: measured once per site, before any edit

    def get(method):
        if method not in eds:
            h = with_anchor(lm, method, hp, corpus, progress=progress, measured=anchors, clean=not eds)
            eds[method] = direct_editor(lm, method, h, corpus, progress=progress, hypernet=hypernet)
        return eds[method]

    first = get(choose_editor(min(batch_size, len(requests)), editor, settings.auto_memit_min_batch,
                              None, settings)[0])
    layers = first.layers
    stats_s = lm.stats_s - stats_before
    health = health or Health.make(lm, requests, hp, corpus, heldout_tokens=heldout_tokens,
                                   entropy_prompts=entropy_prompts)
    saved = snapshot_params(lm.model, [lm.spec.weight_name(l) for l in layers])
    memory = KeyMemory()
    phases = dict(contexts_s=0.0, values_s=0.0, keys_s=0.0, solve_s=0.0, apply_s=0.0)
    after_batch: list[dict] = []
    batches_log, curve = [], []
    converged = 0
    t_probe = time.perf_counter()
    ppl_base = health.perplexity(lm)
    probe_s = time.perf_counter() - t_probe
    try:
        batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
        marks = checkpoints(len(batches), curve_points) if sequential else set()
        report(progress, "bench", 0, len(batches))
        t_edit = time.perf_counter()
        done, growth = 0, 0.0
        for b, batch in enumerate(batches, 1):
            method, reason = choose_editor(len(batch), editor, settings.auto_memit_min_batch,
                                           History(done, growth), settings)
            ed = get(method)
            res = ed.compute(batch, memory=memory)
            t = time.perf_counter()
            apply_result(lm, res)
            if sequential:
                memory.add({l: K for l, K in res.keys.items()})
                if getattr(ed, "last_step", None) is not None:  # UltraEdit: the applied batch's statistics
                    ed.advance(ed.last_step)
            phases["apply_s"] += time.perf_counter() - t
            for k, v in res.timings.items():  # MALMEN's phases: cache_s, hypernet_s, solve_s
                if k.endswith("_s") and k != "total_s":
                    phases[k] = phases.get(k, 0.0) + v
            converged += sum(bool(s.get("converged")) for s in res.value_stats)  # UltraEdit: no v*
            t = time.perf_counter()
            own = fact_metrics(lm.model, lm.tokenizer, batch)
            after_batch.extend(own)
            done += len(batch)
            norms = _norms(lm, saved, layers)
            growth = max(v["delta_rel"] for v in norms.values())
            batches_log.append(dict(index=b, editor=method, reason=reason, n=len(batch),
                                    seconds=res.timings.get("total_s", 0.0), after_batch=aggregate(own),
                                    max_delta_rel=growth))
            if b in marks:
                point = dict(edits=done, metrics=evaluate(lm, requests[:done]), norms=norms,
                             max_delta_rel=growth, perplexity=health.perplexity(lm))
                curve.append(point)
                log(f"{done} edits: efficacy {point['metrics'].get('efficacy', math.nan):.2f}, "
                    f"neighbourhood {point['metrics'].get('neighborhood', math.nan):.2f}")
            probe_s += time.perf_counter() - t
            if not sequential:
                restore_params(lm.model, saved)
            report(progress, "bench", b, len(batches))
        edit_s = time.perf_counter() - t_edit
        eval_t = time.perf_counter()
        final = curve[-1]["metrics"] if sequential else aggregate(after_batch)
        final_norms = curve[-1]["norms"] if sequential else {}
        ppl = curve[-1]["perplexity"] if sequential else ppl_base
        ge = health.entropy(lm) if sequential else None
        eval_s = time.perf_counter() - eval_t + probe_s
    finally:
        restore_params(lm.model, saved)
    edit_only = sum(phases.values())
    return {
        "editor": editor,
        "n": len(requests),
        "batch_size": batch_size,
        "sequential": sequential,
        "metrics": {k: final.get(k, math.nan) for k in sorted(final)},
        "metrics_after_batch": aggregate(after_batch),
        "health": {"perplexity": ppl, "perplexity_base": ppl_base,
                   "perplexity_ratio": ppl / ppl_base if ppl and ppl_base else None,
                   "generation_entropy": ge, "norms": final_norms,
                   "max_delta_rel": max((v["delta_rel"] for v in final_norms.values()), default=None),
                   "note": health.note},
        "editors_used": {m: sum(1 for x in batches_log if x["editor"] == m) for m in eds},
        "batches": batches_log,
        "curve": curve,
        "timing": {"stats_s": stats_s, **phases, "per_fact_s": edit_only / len(requests),
                   "edit_wall_s": edit_s, "eval_s": eval_s},
        "values_converged": converged / len(requests),
        "peak_rss_mb": peak_rss_mb(),
        "hparams": hp.to_dict(),
        **({"hypernet": dict(path=str(hypernet), sha256=eds["malmen"].sha,
                             hyper=eds["malmen"].net.config.to_dict())} if "malmen" in eds else {}),
        **({"ultraedit": dict(eds["ultraedit"].hp.to_dict(), preset_measured=eds["ultraedit"].measured)}
           if "ultraedit" in eds else {}),  # the knobs as they ran (the family's preset filled in)
    }


def baseline(lm: LoadedModel, requests: list[EditRequest], *, hp=None, corpus=None,
             heldout_tokens: int = 8192, entropy_prompts: int = 32, health: Health | None = None) -> dict:
    t = time.perf_counter()
    m = evaluate(lm, requests)
    ppl = ge = None
    note = None
    if hp is not None or health is not None:
        health = health or Health.make(lm, requests, hp, corpus, heldout_tokens=heldout_tokens,
                                       entropy_prompts=entropy_prompts)
        ppl, ge, note = health.perplexity(lm), health.entropy(lm), health.note
    return {"editor": "none (unedited)", "n": len(requests), "batch_size": 0,
            "metrics": {k: m.get(k, math.nan) for k in sorted(m)},
            "health": {"perplexity": ppl, "perplexity_base": ppl, "perplexity_ratio": 1.0 if ppl else None,
                       "generation_entropy": ge, "norms": {}, "max_delta_rel": 0.0, "note": note},
            "timing": {"stats_s": 0.0, "values_s": 0.0, "solve_s": 0.0, "per_fact_s": 0.0,
                       "eval_s": time.perf_counter() - t},
            "peak_rss_mb": peak_rss_mb()}


def benchmark(dataset: str, data, *, n: int, offset: int = 0, model: str | None = None,
              editor: str = "emmet", batch_size: int = 10, preset: str | None = None,
              overrides: dict | None = None, stats_tokens: int | None = None, corpus=None,
              hypernet=None, sequential: bool = True, curve_points: int = 10, heldout_tokens: int = 8192,
              out=None, device: str | None = None, progress: Progress | None = None,
              command: str | None = None) -> dict:
    """`knowledger bench DATASET`: load the facts and the model, run (or measure the unedited
    model for editor "none"), and write the run record (docs/benchmarks.md) to `out` atomically."""
    import json

    from knowledger.agent.direct import prepare
    from knowledger.agent.errors import KnowledgerError
    from knowledger.editors.fileio import atomic_write_text

    requests, skipped = load_requests(Path(data), n, offset)
    if not requests:
        raise KnowledgerError(f"{data}: no valid facts")
    lm, hp = prepare(model, preset, overrides, stats_tokens, device=device)
    if editor == "none":
        record = baseline(lm, requests, hp=hp, corpus=corpus, heldout_tokens=heldout_tokens)
    else:
        record = run(lm, requests, editor=editor, batch_size=batch_size, hp=hp, corpus=corpus,
                     progress=progress, sequential=sequential, curve_points=curve_points,
                     heldout_tokens=heldout_tokens, hypernet=hypernet)
    record.update(dataset=dataset, data=str(data), offset=offset, skipped_invalid=skipped,
                  model=lm.name, weights_sha256=lm.weights_sha256, corpus=corpus, command=command)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), json.dumps(record, indent=2) + "\n")
    return record
