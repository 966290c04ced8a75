"""Time the first-run statistics on the default model: sampling a corpus, then C for the edited
layers, from an empty cache. Prints one JSON line (with the machine's load and CPU seconds).

    python bench/stats_sampling.py --tokens 15360 [--batch-size 64] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=15360)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from knowledger.agent.provenance import provenance
    from knowledger.editors.corpus import Corpus
    from knowledger.editors.hparams import preset_for
    from knowledger.editors.models import load_model, weights_sha256
    from knowledger.editors.stats import second_moments

    model, tok = load_model()
    sha = weights_sha256(model)
    layers = preset_for(model).layers
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = time.process_time(), time.perf_counter()
        corpus = Corpus.sampled(model, tok, a.tokens, weights_sha=sha, cache_dir=Path(tmp) / "c",
                                batch_size=a.batch_size, max_new_tokens=a.new_tokens)
        c1, t1 = time.process_time(), time.perf_counter()
        second_moments(model, tok, layers, corpus, a.tokens, weights_sha=sha, cache_dir=Path(tmp) / "s")
        c2, t2 = time.process_time(), time.perf_counter()
        sample = next(iter(corpus.documents()))[:200]
    row = dict(tokens=a.tokens, batch_size=a.batch_size, new_tokens=a.new_tokens,
               sample_s=round(t1 - t0, 1), sample_cpu_s=round(c1 - c0, 1),
               stats_s=round(t2 - t1, 1), stats_cpu_s=round(c2 - c1, 1),
               total_s=round(t2 - t0, 1), first_document=sample, provenance=provenance())
    print(json.dumps(row))
    if a.out:
        from knowledger.editors.fileio import atomic_write_text
        atomic_write_text(a.out, json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
