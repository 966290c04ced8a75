"""Quick UltraEdit knob probes on the default model: one batch of counterfact-train facts.

    python bench/ultraedit_tune.py --offset 4000 --n 100 --layers 18-23 --lr 1e-4 --ridge 1

Each configuration: one batch edited on the clean weights, then CounterFact metrics on those facts
(success and top-1), perplexity on held-out WikiText (after the first 100k tokens) vs the base,
and ‖ΔW‖/‖W‖; one JSON line per configuration on stdout. The model is restored between them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from knowledger.agent.bench import evaluate, load_requests
from knowledger.agent.editing import open_model
from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params
from knowledger.editors.corpus import Corpus
from knowledger.editors.health import heldout_chunks, perplexity
from knowledger.editors.ultraedit import UltraEditHParams, UltraEditor

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _layers(spec: str) -> tuple[int, ...]:
    a, _, b = spec.partition("-")
    return tuple(range(int(a), int(b) + 1)) if b else tuple(int(x) for x in spec.split(","))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", default=str(DATA / "counterfact" / "counterfact-train.json"))
    ap.add_argument("--offset", type=int, default=4000)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layers", nargs="+", default=["18-23"])
    ap.add_argument("--lr", nargs="+", type=float, default=[1e-4])
    ap.add_argument("--ridge", nargs="+", type=float, default=[1.0])
    ap.add_argument("--heldout", type=int, default=4096)
    ap.add_argument("--ppl0", type=float, default=None, help="the base perplexity, when already measured")
    a = ap.parse_args()
    lm = open_model()
    reqs, _ = load_requests(Path(a.facts), a.n, a.offset)
    chunks = heldout_chunks(Corpus.from_path(DATA / "corpus" / "wiki.test.raw"), lm.tokenizer, a.heldout,
                            skip_tokens=100_000)
    ppl0 = a.ppl0
    if ppl0 is None:
        ppl0 = perplexity(lm.model, lm.tokenizer, chunks)
        print(json.dumps(dict(config="base", perplexity=ppl0, **evaluate(lm, reqs))), flush=True)
    for layers, lr, ridge in itertools.product(a.layers, a.lr, a.ridge):
        hp = UltraEditHParams(layers=_layers(layers), lr=lr, ridge=ridge)
        ed = UltraEditor(lm.model, lm.tokenizer, hp)
        saved = snapshot_params(lm.model, [lm.spec.weight_name(l) for l in hp.layers])
        t = time.perf_counter()
        res = ed.compute(reqs)
        apply_deltas(lm.model, lm.spec, res.deltas)
        secs = time.perf_counter() - t
        m = evaluate(lm, reqs)
        ppl = perplexity(lm.model, lm.tokenizer, chunks)
        rel = max(d["delta_rel_W"] for k, d in res.diagnostics.items() if k.startswith("layer"))
        print(json.dumps(dict(config=hp.to_dict(), seconds=secs, perplexity_ratio=ppl / ppl0,
                              max_delta_rel=rel, **m)), flush=True)
        restore_params(lm.model, saved)


if __name__ == "__main__":
    main()
