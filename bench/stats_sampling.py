"""Time the first-run statistics on the default model from an empty cache: sampling a corpus with
the edited layers' keys collected on the way (the default path), or with --two-pass sampling and
then one statistics pass over the text (the former path). Prints one JSON line (with the machine's load and CPU seconds).

    python bench/stats_sampling.py --tokens 15360 [--batch-size 256] [--new-tokens 64] [--two-pass]
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
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--two-pass", action="store_true", help="the former path: sample, then a statistics pass")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from knowledger.agent.provenance import provenance
    from knowledger.editors.corpus import Corpus
    from knowledger.editors.hparams import preset_for
    from knowledger.editors.models import load_model, weights_sha256
    from knowledger.editors.model_spec import spec_for
    from knowledger.editors.stats import KeyTap, second_moments

    model, tok = load_model()
    sha = weights_sha256(model)
    layers = preset_for(model).layers
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KNOWLEDGER_CACHE"] = tmp  # empty: the first run's path
        c0, t0 = time.process_time(), time.perf_counter()
        if a.two_pass:  # the former path: sample the text, then one pass over it for C
            corpus = Corpus.sampled(model, tok, a.tokens, weights_sha=sha, batch_size=a.batch_size,
                                    max_new_tokens=a.new_tokens)
            c1, t1 = time.process_time(), time.perf_counter()
            second_moments(model, tok, layers, corpus, a.tokens, weights_sha=sha)
        else:  # keys collected while sampling (editors.stats.KeyTap)
            tap = KeyTap(model, spec_for(model), layers)
            corpus = Corpus.sampled(model, tok, a.tokens, weights_sha=sha, batch_size=a.batch_size,
                                    max_new_tokens=a.new_tokens, observe=tap)
            tap.moments()
            c1, t1 = time.process_time(), time.perf_counter()
        c2, t2 = time.process_time(), time.perf_counter()
        sample = next(iter(corpus.documents()))[:200]
    row = dict(tokens=a.tokens, batch_size=a.batch_size, new_tokens=a.new_tokens,
               keys="two passes" if a.two_pass else "collected while sampling",
               sample_s=round(t1 - t0, 1), sample_cpu_s=round(c1 - c0, 1),
               stats_s=round(t2 - t1, 1), stats_cpu_s=round(c2 - c1, 1),
               total_s=round(t2 - t0, 1), total_cpu_s=round(c2 - c0, 1), first_document=sample,
               provenance=provenance())
    print(json.dumps(row))
    if a.out:
        from knowledger.editors.fileio import atomic_write_text
        atomic_write_text(a.out, json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
