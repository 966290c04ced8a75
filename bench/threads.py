"""Threads under load: a fixed v* workload on the default model, timed per thread setting, with and
without a competing busy process (issue 13: one busy core turned 1.07 s/fact into 8.8 s/fact).

Each setting runs in a fresh process (threads and OMP_WAIT_POLICY are read at start). The busy
process is a plain `python -c "while True: pass"` (not niced). Prints and writes one JSON object.

    python bench/threads.py --out bench/results/threads/run.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORK = r"""
import json, os, sys, time
if sys.argv[4] == "knowledger":  # as the CLI does: knowledger.agent first, so its thread rule applies
    import knowledger.agent
import torch
torch.set_num_threads(int(sys.argv[1]))
from knowledger.agent.bench import load_requests
from knowledger.editors.hparams import preset_for
from knowledger.editors.model_spec import spec_for
from knowledger.editors.models import load_model
from knowledger.editors.values import context_prefixes, optimise_values
model, tok = load_model()
hp = preset_for(model).replace(early_stop=False, v_steps=int(sys.argv[3]))
reqs, _ = load_requests(sys.argv[2], 2, 4000)
ctx = context_prefixes(model, tok, hp)
c0, t0 = time.process_time(), time.perf_counter()
with torch.enable_grad():
    optimise_values(model, tok, spec_for(model), reqs, hp, ctx)
print(json.dumps(dict(s_per_fact=(time.perf_counter() - t0) / len(reqs),
                      cpu_s_per_fact=(time.process_time() - c0) / len(reqs), load_avg=os.getloadavg())))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/counterfact/counterfact-train.json")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--settings", nargs="+", default=["2:default", "1:default", "2:PASSIVE", "2:knowledger"],
                    help="THREADS:POLICY pairs, each run in a fresh process; POLICY: default (OpenMP's "
                         "own, active waiting), an OMP_WAIT_POLICY value, or knowledger (no variable "
                         "set, knowledger.agent imported first, as the CLI runs)")
    ap.add_argument("--busy", nargs="+", default=["no", "yes"], help="without / with the busy process")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from knowledger.agent.provenance import provenance
    from knowledger.editors.fileio import atomic_write_text

    settings = [(t, None if p == "default" else p) for t, p in (x.split(":") for x in a.settings)]
    rows = []
    for busy in (b == "yes" for b in a.busy):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for threads, wait in settings:
                env = dict(os.environ)
                env.pop("OMP_WAIT_POLICY", None)
                if wait and wait != "knowledger":
                    env["OMP_WAIT_POLICY"] = wait
                t = time.perf_counter()
                p = subprocess.run([sys.executable, "-c", WORK, threads, a.data, str(a.steps), wait or "default"], env=env,
                                   capture_output=True, text=True)
                line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else None
                row = dict(threads=int(threads), omp_wait_policy=wait or "default", busy_process=busy,
                           **(json.loads(line) if line else dict(error=p.stderr[-500:])),
                           process_s=round(time.perf_counter() - t, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if hog:
                hog.kill()
                hog.wait()
    out = dict(command="python bench/threads.py " + " ".join(sys.argv[1:]),
               workload=f"v* for 2 counterfact-train facts (offset 4000), {a.steps} steps, no early stop",
               rows=rows, provenance=provenance())
    atomic_write_text(a.out, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
