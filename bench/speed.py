"""Speed against a reference-configured baseline, measured in ONE run on the same facts (issue 13).

baseline: knowledger configured as the reference implementation runs v* (REFERENCE.md): learning
    rate 0.5, 25 steps, no early stop, float32, one fact at a time (v_batch 1). Not emulated: the
    reference's full forward every step without a prefix cache (knowledger has no switch for it),
    so the baseline is faster than the reference and the measured ratio understates knowledger's.
defaults: knowledger's preset for the model, unchanged.

Each batch is edited from the unedited weights (restored after), evaluated on its own facts right
after the edit; metrics are means over all facts. Peak RSS per row: VmHWM after resetting it
(/proc/self/clear_refs) before the row. Writes JSON + a Markdown table with the command.

    python bench/speed.py --n 20 --batch-sizes 1 10 --editors emmet memit --out bench/results/speed
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import knowledger.agent  # noqa: F401  (the thread rule, before torch loads)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/counterfact/counterfact-val.json")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--editors", nargs="+", default=["emmet", "memit"])
    ap.add_argument("--corpus", default="/work/shared/data/corpus/wiki.test.raw",
                    help="statistics corpus, the same for both systems ('sampled': the model's own text)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from knowledger.agent.bench import load_requests
    from knowledger.agent.provenance import provenance
    from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params
    from knowledger.editors.editor import Editor
    from knowledger.editors.evaluate import aggregate, fact_metrics
    from knowledger.editors.fileio import atomic_write_text
    from knowledger.editors.hparams import preset_for
    from knowledger.editors.models import load_model, weights_sha256
    from knowledger.editors.stats import second_moments

    model, tok = load_model()
    sha = weights_sha256(model)
    preset = preset_for(model)
    systems = {"baseline (reference v* settings)": preset.replace(
                   v_lr=0.5, v_steps=25, early_stop=False, autocast_bf16=False, v_batch=1),
               "knowledger defaults": preset}
    reqs, _ = load_requests(Path(a.data), a.n, a.offset)
    corpus = None if a.corpus == "sampled" else a.corpus
    C = second_moments(model, tok, preset.layers, corpus, preset.stats_tokens, weights_sha=sha)
    rows = []
    for bs in a.batch_sizes:
        for ed in a.editors:
            for system, hp in systems.items():
                editor = Editor(model, tok, hp, method=ed, second_moments=C, weights_sha=sha)
                editor.contexts  # generated (or loaded) once, outside the timing, for both systems
                saved = snapshot_params(model, [editor.spec.weight_name(l) for l in editor.layers])
                _reset_peak()
                per_fact, edit_s, steps = [], 0.0, []
                for i in range(0, len(reqs), bs):
                    batch = reqs[i:i + bs]
                    t = time.perf_counter()
                    res = editor.compute(batch)
                    apply_deltas(model, editor.spec, res.deltas)
                    edit_s += time.perf_counter() - t
                    steps += [s["steps"] for s in res.value_stats if s]
                    per_fact += fact_metrics(model, tok, batch)
                    restore_params(model, saved)
                m = aggregate(per_fact)
                rows.append(dict(system=system, editor=ed, batch_size=bs, facts=len(reqs),
                                 s_per_fact=round(edit_s / len(reqs), 3),
                                 mean_v_steps=round(sum(steps) / max(1, len(steps)), 1),
                                 peak_rss_mb=_peak_mb(), load_avg=provenance()["load_avg"],
                                 **{k: round(v, 3) for k, v in m.items()}))
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        if r["system"] == "knowledger defaults":
            base = next(b for b in rows if b["editor"] == r["editor"] and b["batch_size"] == r["batch_size"]
                        and b is not r and b["system"] != r["system"])
            r["speedup_vs_baseline"] = round(base["s_per_fact"] / r["s_per_fact"], 2)
    command = "python bench/speed.py " + " ".join(sys.argv[1:])
    out = dict(command=command, facts=dict(file=a.data, n=len(reqs), offset=a.offset),
               statistics=dict(corpus=a.corpus, tokens=preset.stats_tokens), rows=rows,
               provenance=provenance())
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "speed.json", json.dumps(out, indent=1) + "\n")
    cols = ["system", "editor", "batch_size", "s_per_fact", "speedup_vs_baseline", "mean_v_steps",
            "efficacy_acc", "paraphrase_acc", "neighborhood_acc", "efficacy", "paraphrase", "neighborhood",
            "peak_rss_mb", "load_avg"]
    lines = [f"`{command}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    atomic_write_text(a.out / "speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
