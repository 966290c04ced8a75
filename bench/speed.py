"""Speed against a reference-configured baseline, measured in ONE run on the same facts (issue 13).

Systems (choose with --systems; --variant adds more):
- baseline: knowledger configured as the reference implementation runs v* (../shared/REFERENCE.md):
  every step the whole model from the embeddings with full-vocabulary logits at every position
  (v_prefix_cache=False), learning rate 0.5, 25 steps without early stop, float32, one fact at a
  time (v_batch 1). Keys, solves and applying are knowledger's (the reference's keys phase, one full
  pass per edited layer, is not emulated: the baseline is a little faster than the reference).
- defaults: knowledger's preset for the model, unchanged.
- --variant NAME:key=value,key=value: the preset with those hyperparameters changed (levers).

Batches are interleaved: for each batch, every system edits it in turn, so a change of the machine's
load during the run hits all systems alike. Each batch is edited from the unedited weights (restored
after), evaluated on its own facts right after the edit; metrics are means over all facts. Timed:
compute (v* one-time pass and steps, keys, solves) + applying; not timed: the evaluation and the
one-time work every system does alike before its first batch (context prefixes, the Cholesky factor
of λC per layer, like the statistics). Peak RSS per row: VmHWM after resetting it (/proc/self/clear_refs) before
each of the row's batches, the row's maximum. Writes JSON + a Markdown table with the command.

    OMP_NUM_THREADS=1 python bench/speed.py --n 10 --batch-sizes 1 10 --editors emmet memit \
        --offset 1000 --out bench/results/speed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import knowledger.agent  # noqa: F401  (the thread rule, before torch loads)

PHASES = ("values_prefix_s", "values_steps_s", "keys_s", "solve_s", "apply_s")
BASELINE = dict(v_prefix_cache=False, v_lr=0.5, v_steps=25, early_stop=False, autocast_bf16=False, v_batch=1)


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


def _variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    changes = dict(kv.split("=", 1) for kv in body.split(",") if kv)
    return name, changes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/counterfact/counterfact-val.json")
    ap.add_argument("--n", type=int, default=20, help="facts per batch size (a multiple of the batch size)")
    ap.add_argument("--n-per-batch-size", type=int, nargs="+", default=None,
                    help="facts for each batch size, in order (overrides --n)")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--editors", nargs="+", default=["emmet", "memit"])
    ap.add_argument("--systems", nargs="+", default=["baseline", "defaults"])
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (the preset, changed)")
    ap.add_argument("--corpus", default="/work/shared/data/corpus/wiki.test.raw",
                    help="statistics corpus, the same for all systems ('sampled': the model's own text)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="speed", help="file stem of the JSON and Markdown written")
    a = ap.parse_args()
    from knowledger.agent.bench import load_requests
    from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params
    from knowledger.editors.editor import Editor
    from knowledger.editors.evaluate import aggregate, fact_metrics
    from knowledger.editors.hparams import preset_for
    from knowledger.editors.models import load_model, weights_sha256
    from knowledger.editors.stats import second_moments

    model, tok = load_model()
    sha = weights_sha256(model)
    preset = preset_for(model)
    known = {"baseline": preset.replace(**BASELINE), "defaults": preset}
    systems = {s: known[s] for s in a.systems}
    for text in a.variant:
        name, changes = _variant(text)
        systems[name] = preset.replace(**changes)
    sizes = a.n_per_batch_size or [a.n] * len(a.batch_sizes)
    reqs, _ = load_requests(Path(a.data), max(sizes), a.offset)
    corpus = None if a.corpus == "sampled" else a.corpus
    t = time.perf_counter()
    C = second_moments(model, tok, preset.layers, corpus, preset.stats_tokens, weights_sha=sha)
    stats_s = time.perf_counter() - t
    rows = []
    for bs, n in zip(a.batch_sizes, sizes):
        facts = reqs[:n]
        for ed in a.editors:
            editors = {s: Editor(model, tok, hp, method=ed, second_moments=C, weights_sha=sha)
                       for s, hp in systems.items()}
            for e in editors.values():  # one-time work outside the timing, for every system alike:
                e.contexts  # the context prefixes, generated (or loaded) once
                for layer in e.layers:
                    e.solver(layer)  # the float64 Cholesky factor of λC per layer (~0.15 s each)
            first = next(iter(editors.values()))
            saved = snapshot_params(model, [first.spec.weight_name(l) for l in first.layers])
            acc = {s: dict(per_fact=[], edit_s=0.0, steps=[], to_loss=[], peak=0.0,
                           phases=dict.fromkeys(PHASES, 0.0), load=[]) for s in systems}
            for i in range(0, len(facts), bs):
                batch = facts[i:i + bs]
                for s, editor in editors.items():
                    r = acc[s]
                    r["load"].append(os.getloadavg()[0])
                    _reset_peak()
                    t = time.perf_counter()
                    res = editor.compute(batch)
                    ta = time.perf_counter()
                    apply_deltas(model, editor.spec, res.deltas)
                    r["edit_s"] += time.perf_counter() - t
                    r["phases"]["apply_s"] += time.perf_counter() - ta
                    for k in PHASES[:-1]:
                        r["phases"][k] += res.timings.get(k, 0.0)
                    r["peak"] = max(r["peak"], _peak_mb() or 0.0)
                    r["steps"] += [st["steps"] for st in res.value_stats if st]
                    r["to_loss"] += [st.get("steps_to_loss") for st in res.value_stats if st]
                    r["per_fact"] += fact_metrics(model, tok, batch)
                    restore_params(model, saved)
            for s, r in acc.items():
                m = aggregate(r["per_fact"])
                reached = [x for x in r["to_loss"] if x is not None]
                rows.append(dict(system=s, editor=ed, batch_size=bs, facts=n,
                                 s_per_fact=round(r["edit_s"] / n, 3),
                                 **{k.removesuffix("_s") + "_s_per_fact": round(v / n, 3)
                                    for k, v in r["phases"].items()},
                                 mean_v_steps=round(sum(r["steps"]) / max(1, len(r["steps"])), 1),
                                 mean_steps_to_loss=round(sum(reached) / len(reached), 1) if reached else None,
                                 reached_loss=len(reached),
                                 peak_rss_mb=round(r["peak"], 1),
                                 load_1min=[round(min(r["load"]), 2), round(max(r["load"]), 2)],
                                 hparams_changed={k: v for k, v in systems[s].to_dict().items()
                                                  if v != preset.to_dict()[k]},
                                 **{k: round(v, 3) for k, v in m.items()}))
                print(json.dumps(rows[-1]), flush=True)
            write(a, rows, sizes, preset, stats_s, systems)
    write(a, rows, sizes, preset, stats_s, systems)


def write(a, rows, sizes, preset, stats_s, systems) -> None:
    """JSON + Markdown of the rows so far (called after every batch size × editor: a cut run keeps them)."""
    from knowledger.agent.provenance import provenance
    from knowledger.editors.fileio import atomic_write_text

    for r in rows:
        base = next((b for b in rows if b["system"] == "baseline" and b["editor"] == r["editor"]
                     and b["batch_size"] == r["batch_size"]), None)
        if base is not None and r is not base:
            r["speedup_vs_baseline"] = round(base["s_per_fact"] / r["s_per_fact"], 2)
    command = "python bench/speed.py " + " ".join(sys.argv[1:])
    out = dict(command=command, environment={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
               facts=dict(file=a.data, n=max(sizes), offset=a.offset),
               statistics=dict(corpus=a.corpus, tokens=preset.stats_tokens, seconds=round(stats_s, 1)),
               systems={s: hp.to_dict() for s, hp in systems.items()}, rows=rows, provenance=provenance())
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / f"{a.name}.json", json.dumps(out, indent=1) + "\n")
    cols = ["system", "editor", "batch_size", "facts", "s_per_fact", "speedup_vs_baseline",
            "values_prefix_s_per_fact", "values_steps_s_per_fact", "keys_s_per_fact", "solve_s_per_fact",
            "apply_s_per_fact", "mean_v_steps", "mean_steps_to_loss",
            "efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc", "neighborhood_acc",
            "peak_rss_mb", "load_1min"]
    env = " ".join(f"{k}={v}" for k, v in out["environment"].items() if v)
    lines = [f"`{env} {command}`".replace("` ", "`"), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    atomic_write_text(a.out / f"{a.name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
