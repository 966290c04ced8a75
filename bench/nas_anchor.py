"""The NAS anchor of a model, measured as a workspace measures it (agent.anchors.measure): the 20
pilot facts' ‖v*‖ on the clean weights with MEMIT's v* step and the family preset, ā = their mean
after dropping the norms above the 95th percentile. Prints one JSON object (with provenance).

    OMP_NUM_THREADS=1 python bench/nas_anchor.py --corpus ../shared/data/corpus/wiki.test.raw \
        --stats-tokens 5000 > bench/results/nas/smollm2-135m.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name or path [default: the default model]")
    ap.add_argument("--corpus", default=None, help="statistics corpus [default: sampled from the model]")
    ap.add_argument("--stats-tokens", type=int, default=5000)
    args = ap.parse_args()

    import torch

    from knowledger.agent.anchors import measure
    from knowledger.agent.editing import make_editor, open_model, resolve_hparams
    from knowledger.agent.provenance import provenance
    from knowledger.editors.nas import PILOT_FACTS, PILOT_SHA256

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = open_model(args.model)
    hp = resolve_hparams(lm, None, {"stats_tokens": args.stats_tokens})
    editor = make_editor(lm, "memit", hp, args.corpus, progress=False)
    editor.contexts  # noqa: B018 (generated before the timer starts)
    t = time.perf_counter()
    anchor, norms = measure(editor, progress=lambda phase, done, total: print(
        f"{phase} {done}/{total} {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t
    print(json.dumps(dict(model=lm.name, weights_sha256=lm.weights_sha256, layer=hp.v_layer, layers=list(hp.layers),
                          anchor=anchor.to_dict(), pilot_sha256=PILOT_SHA256,
                          pilots=[dict(fact=list(f), norm=round(n, 3)) for f, n in zip(PILOT_FACTS, norms)],
                          seconds=round(seconds, 1), provenance=provenance()), indent=1, default=str))


if __name__ == "__main__":
    main()
