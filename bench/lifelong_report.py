"""Table (Markdown), summary (JSON) and curves (PNG) of bench/lifelong_long.py runs, partial or done.

    python bench/lifelong_report.py RUN_DIR [RUN_DIR ...] --out bench/results/lifelong-10k/

Each RUN_DIR holds a progress.json; a run still going (or stopped for the day) is reported as far
as it got, and the table says how many of its edits are done. A run named `none` (the unedited
model, evaluated on the same samples) gives the baseline each row's neighbourhood is read against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (name in the curve point, column heading)
COLUMNS = (("efficacy", "ES"), ("efficacy_acc", "ES top-1"), ("paraphrase", "PS"),
           ("paraphrase_acc", "PS top-1"), ("neighborhood", "NS"), ("neighborhood_acc", "NS top-1"))
PLOTTED = ("efficacy", "efficacy_acc", "paraphrase", "neighborhood", "perplexity_ratio", "max_norm_growth",
           "generation_entropy", "seconds_per_fact")

TITLES = {"efficacy_acc": "efficacy top-1", "perplexity_ratio": "perplexity × base",
          "max_norm_growth": "max ‖W−W₀‖/‖W₀‖ (edited layers)", "seconds_per_fact": "seconds per fact (editing)"}


def load(run_dir: Path) -> dict:
    p = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))
    cfg = p["config"]
    name = cfg["editor"] + (" +NAS" if cfg.get("hparams", {}).get("nas") else "")
    curve = []
    for pt in p["curve"]:
        row = dict(edits=pt["edits"], n_eval=pt["n_eval"], seconds_per_fact=pt["seconds_per_fact"],
                   perplexity_ratio=pt.get("perplexity_ratio"), generation_entropy=pt.get("generation_entropy"),
                   max_norm_growth=max((n["delta_rel"] for n in (pt.get("norms") or {}).values()), default=0.0))
        row.update({k: pt["metrics"].get(k) for k, _ in COLUMNS})
        curve.append(row)
    return dict(name=name, dir=str(run_dir), config=cfg, batches_done=p["batches_done"],
                edits_done=min(p["batches_done"] * cfg["batch"], cfg["n"]), n=cfg["n"],
                edit_seconds=p["edit_s"], perplexity_base=p.get("perplexity_base"), curve=curve)


def _f(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def table(runs: list[dict]) -> str:
    head = ["row", "edits done / planned", "at edits"] + [h for _, h in COLUMNS] + [
        "ppl ×base", "max ‖W−W₀‖/‖W₀‖", "gen. entropy", "s/fact"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        last = r["curve"][-1] if r["curve"] else {}
        cells = [r["name"], f"{r['edits_done']:,} / {r['n']:,}", f"{last.get('edits', 0):,}"]
        cells += [_f(last.get(k)) for k, _ in COLUMNS]
        cells += [_f(last.get("perplexity_ratio"), ".2f"), _f(last.get("max_norm_growth")),
                  _f(last.get("generation_entropy"), ".2f"),
                  _f(r["edit_seconds"] / r["edits_done"], ".2f") if r["edits_done"] and r["name"] != "none" else "–"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, key in zip(axes.flat, PLOTTED):
        for r in runs:
            if key == "seconds_per_fact" and r["name"] == "none":
                continue
            pts = [(p["edits"], p[key]) for p in r["curve"] if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=r["name"], linestyle="--" if r["name"] == "none" else "-")
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """fig as a PNG at path, written atomically (editors.fileio): a killed report leaves no half file."""
    import io

    from knowledger.editors.fileio import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    runs = [load(d) for d in a.runs]
    a.out.mkdir(parents=True, exist_ok=True)
    from knowledger.editors.fileio import atomic_write_text

    atomic_write_text(a.out / "summary.json", json.dumps(runs, indent=1))
    atomic_write_text(a.out / "table.md", table(runs) + "\n")
    plot(runs, a.out / "curves.png")
    print(table(runs))


if __name__ == "__main__":
    main()
