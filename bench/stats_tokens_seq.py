"""Edit quality after 100 and after 1,000 sequential edits against the statistics' token count and
source (issue 13): a table (Markdown), the numbers (JSON) and the curves (PNG) from
bench/lifelong_long.py runs that differ only in `stats_tokens` and `--corpus`.

    for spec in sampled:15360 sampled:5000 wiki:100000 wiki:15360 wiki:5000; do
      src=${spec%%:*}; tok=${spec##*:}
      OMP_NUM_THREADS=1 python bench/lifelong_long.py --editor memit --offset 6000 --n 1000 \
        --batch 100 --corpus $src --hparams "{\"stats_tokens\": $tok}" --curve-every 1000 \
        --curve-at 100 --eval-sample 300 --entropy-prompts 20 --out runs/stats-seq/memit-$src-$tok
    done
    python bench/stats_tokens_seq.py runs/stats-seq/* --out bench/results/stats-tokens/seq-memit

A run still going is reported at the points it reached.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (("efficacy", "ES"), ("efficacy_acc", "ES top-1"), ("paraphrase", "PS"),
           ("paraphrase_acc", "PS top-1"), ("neighborhood", "NS"), ("neighborhood_acc", "NS top-1"))
PLOTTED = ("efficacy_acc", "paraphrase", "neighborhood", "perplexity_ratio")
TITLES = {"efficacy_acc": "efficacy top-1", "paraphrase": "paraphrase success",
          "neighborhood": "neighbourhood success", "perplexity_ratio": "perplexity × base"}


def load(run_dir: Path) -> dict:
    p = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))
    cfg = p["config"]
    points = {}
    for pt in p["curve"]:
        row = {k: pt["metrics"].get(k) for k, _ in COLUMNS}
        row.update(perplexity_ratio=pt.get("perplexity_ratio"), generation_entropy=pt.get("generation_entropy"),
                   n_eval=pt["n_eval"], seconds_per_fact=pt["seconds_per_fact"])
        points[pt["edits"]] = row
    return dict(dir=str(run_dir), editor=cfg["editor"], source=cfg.get("corpus", "wiki"),
                tokens=int(cfg["hparams"]["stats_tokens"]), batch=cfg["batch"], n=cfg["n"],
                edits_done=min(p["batches_done"] * cfg["batch"], cfg["n"]), points=points)


def _f(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def table(runs: list[dict], at: list[int]) -> str:
    head = ["editor", "source", "tokens", "at edits", *[h for _, h in COLUMNS], "ppl ×base", "gen. entropy", "s/fact"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=lambda r: (r["source"], r["tokens"])):
        for e in at:
            pt = r["points"].get(e)
            if pt is None:
                continue
            out.append("| " + " | ".join([r["editor"], r["source"], f"{r['tokens']:,}", f"{e:,}",
                                          *[_f(pt[k]) for k, _ in COLUMNS], _f(pt["perplexity_ratio"], ".2f"),
                                          _f(pt["generation_entropy"], ".2f"), _f(pt["seconds_per_fact"], ".2f")]) + " |")
    return "\n".join(out)


def plot(runs: list[dict], at: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:  # imported as bench.stats_tokens_seq (tests) or run as a script from bench/
        from bench.lifelong_report import save_figure
    except ImportError:
        from lifelong_report import save_figure

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.5 * len(PLOTTED), 4))
    for ax, key in zip(axes, PLOTTED):
        for source in sorted({r["source"] for r in runs}):
            for e, style in zip(at, ("--", "-", ":")):
                pts = sorted((r["tokens"], r["points"][e][key]) for r in runs
                             if r["source"] == source and e in r["points"] and r["points"][e].get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle=style, label=f"{source}, after {e:,}")
        ax.set_xscale("log")
        ax.set_title(TITLES[key])
        ax.set_xlabel("statistics tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--at", type=int, nargs="+", default=[100, 1000])
    a = ap.parse_args()
    runs = [load(d) for d in a.runs if (d / "progress.json").is_file()]
    a.out.mkdir(parents=True, exist_ok=True)
    from knowledger.editors.fileio import atomic_write_text

    atomic_write_text(a.out / "summary.json", json.dumps(runs, indent=1))
    atomic_write_text(a.out / "table.md", table(runs, a.at) + "\n")
    plot(runs, a.at, a.out / "curves.png")
    print(table(runs, a.at))


if __name__ == "__main__":
    main()
