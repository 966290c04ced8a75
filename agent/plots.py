"""Tables and charts of benchmark runs (and the one place matplotlib's backend is chosen).

`pyplot()` selects the non-interactive Agg backend once and returns matplotlib.pyplot; every chart
in the agent (bench, report, MALMEN training history) should get pyplot from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from knowledger.agent.bench import metric_names
from knowledger.editors.methods import method_names

# Display order of the editors in a combined table (the rest after these, by name).
EDITOR_ORDER = ("none (unedited)",) + method_names() + ("auto",)  # editors.methods' table order


@cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (selected once, on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sort_runs(runs: list[dict]) -> list[dict]:
    """Runs in display order: editor (EDITOR_ORDER, then by name), then batch size."""
    order = {name: i for i, name in enumerate(EDITOR_ORDER)}
    return sorted(runs, key=lambda r: (order.get(r["editor"], len(order)), r["editor"], r["batch_size"]))


def label(run: dict) -> str:
    """The editor, and what differs from the defaults: bf16 v*, statistics from sampled text."""
    if run["batch_size"] == 0:
        return run["editor"]
    extras = (["bf16 v*"] if run.get("hparams", {}).get("autocast_bf16") else []) + \
             (["sampled C"] if run.get("corpus", "") is None else [])
    used = run.get("editors_used") or {}
    if run["editor"] == "auto" and used:
        extras.append("→ " + "+".join(f"{m}×{k}" for m, k in used.items() if k))
    if run.get("sequential") is False:
        extras.append("independent batches")
    return run["editor"] + (f" ({', '.join(extras)})" if extras else "")


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(runs: list[dict]) -> str:
    names = metric_names(runs)
    head = ("| editor | n | batch | " + " | ".join(names) + " | ppl ×base | max ‖ΔW‖/‖W‖ | GE "
            "| s/fact | v* s | keys s | solve s | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        m, t, h = r["metrics"], r["timing"], r.get("health") or {}
        cells = [label(r), r["n"], r["batch_size"] or "-"]
        cells += [f"{m.get(k, math.nan):.3f}" for k in names]
        cells += [_fmt(h.get("perplexity_ratio"), ".3f"), _fmt(h.get("max_delta_rel"), ".3f"),
                  _fmt(h.get("generation_entropy"), ".2f")]
        cells += [f"{t.get('per_fact_s', 0):.2f}", f"{t.get('values_s', 0):.1f}", f"{t.get('keys_s', 0):.1f}",
                  f"{t.get('solve_s', 0):.1f}", f"{r.get('peak_rss_mb', 0):.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path) -> Path | None:
    """Lifelong curves: efficacy, paraphrase and neighbourhood of all facts edited so far, held-out
    perplexity relative to the base and the largest ‖W − W_base‖/‖W_base‖, against edits applied."""
    runs = [r for r in runs if r.get("curve")]
    if not runs:
        return None
    plt = pyplot()

    panels = [("efficacy", "efficacy (all so far)"), ("paraphrase", "paraphrase (all so far)"),
              ("neighborhood", "neighbourhood (all so far)"), ("efficacy_acc", "efficacy top-1"),
              ("ppl", "perplexity / base"), ("norm", "max ‖W−W₀‖/‖W₀‖")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, title) in zip(axes.flat, panels):
        for r in runs:
            xs = [p["edits"] for p in r["curve"]]
            if key == "ppl":
                base = (r.get("health") or {}).get("perplexity_base")
                ys = [p["perplexity"] / base if p.get("perplexity") and base else math.nan for p in r["curve"]]
            elif key == "norm":
                ys = [p["max_delta_rel"] for p in r["curve"]]
            else:
                ys = [p["metrics"].get(key, math.nan) for p in r["curve"]]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{label(r)} b={r['batch_size']}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits applied")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{runs[0].get('dataset', '')}: lifelong editing, {runs[0].get('model', '')}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(runs: list[dict], path: Path) -> Path:
    """Grouped bars: the six quality metrics per run; seconds per fact on a second panel."""
    plt = pyplot()

    labels = [f"{label(r).replace(' (', chr(10) + '(')}\nb={r['batch_size'] or '-'}" for r in runs]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, len(runs) * 0.9), 7),
                                  gridspec_kw={"height_ratios": [3, 1]})
    names = metric_names(runs)
    width = 0.8 / len(names)
    for j, k in enumerate(names):
        xs = [i + (j - len(names) / 2) * width + width / 2 for i in range(len(runs))]
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


@dataclass(frozen=True)
class CombinedRuns:
    """`knowledger bench table`: the Markdown table and the files written."""

    table: str
    md: str | None = None
    png: str | None = None
    curves: str | None = None  # None also when no run has curves


def combine(results, *, md=None, png=None, curves=None) -> CombinedRuns:
    """Benchmark JSON files -> one Markdown table (written to `md`), a bar chart, the curves."""
    import json

    from knowledger.editors.fileio import atomic_write_text

    runs = sort_runs([json.loads(Path(p).read_text(encoding="utf-8")) for p in results])
    text = markdown_table(runs)
    if md:
        atomic_write_text(Path(md), text + "\n")
    if png:
        plot(runs, Path(png))
    drawn = plot_curves(runs, Path(curves)) if curves else None
    return CombinedRuns(text, md and str(md), png and str(png), drawn and str(drawn))
