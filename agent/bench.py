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
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from knowledger.editors.apply import restore_params, snapshot_params
from knowledger.editors.evaluate import aggregate, fact_metrics
from knowledger.editors.requests import EditRequest

from .editing import LoadedModel, apply_result, make_editor, requests_from_facts

METRICS = ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc", "neighborhood_acc")


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


def run(lm: LoadedModel, requests: list[EditRequest], *, editor: str, batch_size: int, hp,
        corpus=None, progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """Edit `requests` in consecutive batches; return the run record. The model is restored after."""
    stats_before = lm.stats_s
    ed = make_editor(lm, editor, hp, corpus, progress=progress)
    stats_s = lm.stats_s - stats_before
    saved = snapshot_params(lm.model, [lm.spec.weight_name(l) for l in ed.layers])
    phases = dict(contexts_s=0.0, values_s=0.0, keys_s=0.0, solve_s=0.0, apply_s=0.0)
    after_batch: list[dict] = []
    converged = 0
    try:
        batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
        bar = tqdm(batches, desc=f"{editor} b={batch_size}", unit="batch", disable=not progress)
        t_edit = time.perf_counter()
        for batch in bar:
            res = ed.compute(batch)
            t = time.perf_counter()
            apply_result(lm, res)
            phases["apply_s"] += time.perf_counter() - t
            for k in ("contexts_s", "values_s", "keys_s", "solve_s"):
                phases[k] += res.timings.get(k, 0.0)
            converged += sum(s["converged"] for s in res.value_stats)
            after_batch.extend(fact_metrics(lm.model, lm.tokenizer, batch))
        edit_s = time.perf_counter() - t_edit
        eval_t = time.perf_counter()
        final = evaluate(lm, requests)
        eval_s = time.perf_counter() - eval_t
    finally:
        restore_params(lm.model, saved)
    edit_only = sum(phases.values())
    return {
        "editor": editor,
        "n": len(requests),
        "batch_size": batch_size,
        "metrics": {k: final.get(k, math.nan) for k in sorted(final)},
        "metrics_after_batch": aggregate(after_batch),
        "timing": {"stats_s": stats_s, **phases, "per_fact_s": edit_only / len(requests),
                   "edit_wall_s": edit_s, "eval_s": eval_s},
        "values_converged": converged / len(requests),
        "peak_rss_mb": peak_rss_mb(),
        "hparams": hp.to_dict(),
    }


def baseline(lm: LoadedModel, requests: list[EditRequest]) -> dict:
    t = time.perf_counter()
    m = evaluate(lm, requests)
    return {"editor": "none (unedited)", "n": len(requests), "batch_size": 0,
            "metrics": {k: m.get(k, math.nan) for k in sorted(m)},
            "timing": {"stats_s": 0.0, "values_s": 0.0, "solve_s": 0.0, "per_fact_s": 0.0,
                       "eval_s": time.perf_counter() - t},
            "peak_rss_mb": peak_rss_mb()}


def label(run: dict) -> str:
    """The editor, and what differs from the defaults: bf16 v*, statistics from sampled text."""
    if run["batch_size"] == 0:
        return run["editor"]
    extras = (["bf16 v*"] if run.get("hparams", {}).get("autocast_bf16") else []) + \
             (["sampled C"] if run.get("corpus", "") is None else [])
    return run["editor"] + (f" ({', '.join(extras)})" if extras else "")


def markdown_table(runs: list[dict]) -> str:
    head = ("| editor | n | batch | efficacy | paraphrase | neighborhood | efficacy_acc | paraphrase_acc "
            "| neighborhood_acc | s/fact | v* s | keys s | solve s | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        m, t = r["metrics"], r["timing"]
        cells = [label(r), r["n"], r["batch_size"] or "-"]
        cells += [f"{m.get(k, math.nan):.3f}" for k in METRICS]
        cells += [f"{t.get('per_fact_s', 0):.2f}", f"{t.get('values_s', 0):.1f}", f"{t.get('keys_s', 0):.1f}",
                  f"{t.get('solve_s', 0):.1f}", f"{r.get('peak_rss_mb', 0):.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> Path:
    """Grouped bars: the six quality metrics per run; seconds per fact on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{label(r).replace(' (', chr(10) + '(')}\nb={r['batch_size'] or '-'}" for r in runs]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, len(runs) * 0.9), 7),
                                  gridspec_kw={"height_ratios": [3, 1]})
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        xs = [i + (j - len(METRICS) / 2) * width + width / 2 for i in range(len(runs))]
        ax.bar(xs, [r["metrics"].get(k, math.nan) for r in runs], width, label=k)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("fraction")
    ax.legend(ncol=6, fontsize=8, loc="upper center", frameon=False)
    ax.set_title(f"{runs[0].get('dataset', '')}: {runs[0]['n']} facts, metrics after all edits")
    ax2.bar(range(len(runs)), [r["timing"].get("per_fact_s", 0) for r in runs], color="grey")
    ax2.set_xticks(range(len(runs)), labels)
    ax2.set_ylabel("s / fact")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
