"""Tokens per second and per CPU-second of the statistics sampler (editors.corpus._generate) on
the default model, for one batch shape; one line of text with the machine's load.

    python bench/sampler_speed.py --rows 256 --steps 32 [--attn eager] [--int8] [--bf16 on|off]

Threads: set OMP_NUM_THREADS (and OMP_WAIT_POLICY=PASSIVE, knowledger's rule) in the environment.
--int8 samples with a copy under torch's dynamic int8 quantisation of every Linear (a measured
lever, not what knowledger runs). --bf16 on|off: the forward under bf16 autocast or not (default:
what knowledger does here, `corpus.has_bf16_units`).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--bf16", choices=["on", "off"], default=None)
    a = ap.parse_args()
    from knowledger.editors import corpus as C
    from knowledger.editors.models import load_model

    model, tok = load_model()
    if a.attn != "sdpa":
        model.set_attn_implementation(a.attn)
    if a.int8:
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                       dtype=torch.qint8)
    encoded = [[tok.bos_token_id or 1] + tok("The")["input_ids"]] * a.rows
    gen = torch.Generator().manual_seed(0)
    bf16 = C.has_bf16_units("cpu") if a.bf16 is None else a.bf16 == "on"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        C._generate(model, encoded[:8], 2, 2, tok.pad_token_id, [], gen, "cpu")  # warm up
        c0, t0 = time.process_time(), time.perf_counter()
        C._generate(model, encoded, 2, a.steps, tok.pad_token_id, [], gen, "cpu")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = a.rows * a.steps
    print(f"rows={a.rows} steps={a.steps} attn={a.attn} int8={a.int8} bf16={bf16} threads={torch.get_num_threads()} "
          f"wall={wall:.1f}s cpu={cpu:.1f}s tokens/s={n / wall:.0f} tokens/cpu-s={n / cpu:.0f} "
          f"load={[round(x, 2) for x in os.getloadavg()]}")


if __name__ == "__main__":
    main()
