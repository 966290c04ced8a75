"""Peak RSS of MEMIT's keys phase against the batch size, with and without row chunking (issue 13).

The keys phase runs every fact's context prompts (6 per fact) through the edited layers; unchunked,
its activations grow with the batch (the 1,000-fact MEMIT row in docs/benchmarks.md peaked at 9.2 GB).
This program runs the keys phase alone (editors.editor._KeyPass over all edited layers, no v*, no
solve) for each batch size, in a fresh process per setting so each peak is its own, and writes JSON.

    OMP_NUM_THREADS=1 python bench/keys_memory.py --n 50 200 --out bench/results/speed/keys-memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import knowledger.agent  # noqa: F401  (the thread rule, before torch loads)


def one(n: int, rows: int, buckets: int, data: str, offset: int) -> dict:
    from knowledger.agent.bench import load_requests
    from knowledger.editors import editor as editor_module
    from knowledger.editors.editor import Editor, _KeyPass
    from knowledger.editors.hparams import preset_for
    from knowledger.editors.models import load_model, weights_sha256

    model, tok = load_model()
    hp = preset_for(model)
    import torch
    C = {l: torch.eye(1536) for l in hp.layers}  # keys do not depend on C
    editor_module.KEY_ROWS, editor_module.KEY_BUCKETS = rows, buckets
    ed = Editor(model, tok, hp, method="memit", second_moments=C, weights_sha=weights_sha256(model))
    ed.contexts
    reqs, _ = load_requests(Path(data), n, offset)
    base = _rss()
    Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    kp = _KeyPass(ed, reqs, ed.contexts)
    with torch.no_grad():
        for layer in ed.layers:
            kp.at(layer)
    return dict(n=n, key_rows=rows, key_buckets=buckets, seconds=round(time.perf_counter() - t, 1),
                rss_before_mb=round(base, 1), peak_rss_mb=round(_hwm(), 1))


def _rss() -> float:
    return _status("VmRSS:")


def _hwm() -> float:
    return _status("VmHWM:")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--data", default="/work/shared/data/counterfact/counterfact-train.json")
    ap.add_argument("--offset", type=int, default=6000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)  # n rows buckets (child)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one, a.data, a.offset)))
        return
    from knowledger.agent.provenance import provenance
    from knowledger.editors.fileio import atomic_write_text

    rows = []
    for n in a.n:
        for key_rows, buckets in ((10**9, 1), (512, 3)):
            out = subprocess.run([sys.executable, __file__, "--data", a.data, "--offset", str(a.offset),
                                  "--out", str(a.out), "--one", str(n), str(key_rows), str(buckets)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    command = "python bench/keys_memory.py " + " ".join(sys.argv[1:])
    atomic_write_text(a.out, json.dumps(dict(command=command, rows=rows, provenance=provenance()), indent=1) + "\n")


if __name__ == "__main__":
    main()
