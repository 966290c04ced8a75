"""The stats-tokens curve as a PNG and a Markdown table, from bench/stats_tokens.py's JSON.

    python bench/plot_stats_tokens.py bench/results/stats-tokens/curve-n30.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("efficacy_acc", "paraphrase_acc", "efficacy", "paraphrase", "neighborhood")


def table(rows: list[dict]) -> str:
    cols = ("editor", "source", "tokens") + METRICS + ("load_avg",)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get("editor"), r.get("source"), f"{r.get('tokens', 0):,}"]
        cells += [f"{r[m]:.3f}" if isinstance(r.get(m), float) else str(r.get(m, r.get("error", "")))
                  for m in METRICS]
        cells.append(", ".join(f"{x:.1f}" for x in r.get("load_avg") or []))
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1])
    run = json.loads(path.read_text())
    rows = run["rows"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    editors = sorted({r["editor"] for r in rows if r["editor"] != "none"})
    fig, axes = plt.subplots(1, len(editors), figsize=(6 * len(editors), 4), squeeze=False)
    for ax, ed in zip(axes[0], editors):
        for src, style in (("wikitext", "-"), ("sampled", "--")):
            pts = sorted((r["tokens"], r) for r in rows if r["editor"] == ed and r["source"] == src
                         and "efficacy" in r)
            for m, colour in zip(("efficacy_acc", "paraphrase", "neighborhood"), ("C0", "C1", "C2")):
                if pts:
                    ax.plot([t for t, _ in pts], [r[m] for _, r in pts], style, color=colour, marker="o",
                            label=f"{m} ({src})")
        ax.set_xscale("log"); ax.set_xlabel("statistics tokens"); ax.set_ylim(0, 1.02)
        ax.axvline(15360, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{ed}, {run['facts']['n']} counterfact-train facts, one batch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    from knowledger.editors.fileio import atomic_write_text
    atomic_write_text(path.with_suffix(".md"), f"`{run['command']}`\n\n{table(rows)}\n")
    print(table(rows))
    print(png)


if __name__ == "__main__":
    main()
