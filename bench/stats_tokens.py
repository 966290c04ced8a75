"""Edit quality against the number of statistics tokens and their source (issue 13, priority 1).

One batch of N CounterFact-train facts (never -val: this chooses a default) is edited from the
unedited model with EMMET and MEMIT, using C from each (source, tokens) point. v* does not depend
on C for a batch edited from the unedited weights, so it is optimised once and shared by every
point (memoised); keys, solves and evaluation are redone per point. C for all token counts of one
source comes from one pass over its text in corpus order, snapshotted at each count (the counts'
token sets are nested prefixes, as `Corpus.chunks` would cut them).

    python bench/stats_tokens.py --n 50 --tokens 2000 5000 15360 30000 60000 \
        --sampled-max 30000 --out bench/results/stats-tokens/run.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import knowledger.agent  # noqa: F401  (the thread rule, before torch loads)
import torch

log = logging.getLogger("stats_tokens")


def snapshots(model, tok, spec, layers, corpus, counts, seq_len=128, batch_size=16):
    """{count: {layer: C (d_in, d_in) float32}} from one pass over corpus.chunks(max(counts))."""
    from knowledger.editors.hooks import TraceDict

    counts = sorted(counts)
    chunks = corpus.chunks(tok, counts[-1], seq_len)
    names = {i: spec.mlp_out_name(i) for i in layers}
    d = spec.mlp_dims(model, layers[0])[1]
    sums = {i: torch.zeros(d, d, dtype=torch.float64) for i in layers}
    out, n, want = {}, 0, list(counts)
    # rows in corpus order, cut at the snapshot counts so that each prefix is exact
    rows: list[list[int]] = []
    for c in chunks:
        while want and n + len(c) > want[0] and n < want[0]:
            cut = want[0] - n
            rows.append(c[:cut]); n += cut; c = c[cut:]
            rows.append(None)  # snapshot marker
            want.pop(0)
        if c:
            rows.append(c); n += len(c)
            if want and n == want[0]:
                rows.append(None); want.pop(0)
    if want:
        rows.append(None)
    count, batch = 0, []

    def flush():
        nonlocal count
        if not batch:
            return
        w = max(map(len, batch))
        ids = torch.zeros(len(batch), w, dtype=torch.long)  # (b, t)
        mask = torch.zeros(len(batch), w, dtype=torch.long)  # (b, t)
        for r, s in enumerate(batch):
            ids[r, :len(s)] = torch.tensor(s); mask[r, :len(s)] = 1
        with torch.inference_mode(), TraceDict(model, names.values(), retain_input=True,
                                               retain_output=False, stop=True) as td:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        real = mask.bool()
        for i, name in names.items():
            K = td[name].input[real].float()  # (n, d_in)
            sums[i] += K.T @ K
        count += int(real.sum())
        batch.clear()

    done = 0
    for r in rows:
        if r is None:
            flush()
            out[count] = {i: ((s / count) + (s / count).T).float() / 2 for i, s in sums.items()}
            log.info("C snapshot at %d tokens (%s)", count, corpus.path.name)
            done += 1
            continue
        batch.append(r)
        if len(batch) == batch_size:
            flush()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/counterfact/counterfact-train.json")
    ap.add_argument("--wikitext", default="/work/shared/data/corpus/wiki.test.raw")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--offset", type=int, default=4000)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2000, 5000, 15360, 30000, 60000])
    ap.add_argument("--sampled-max", type=int, default=30000, help="largest count for sampled text")
    ap.add_argument("--editors", nargs="+", default=["emmet", "memit"])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from knowledger.agent.bench import load_requests
    from knowledger.agent.provenance import provenance
    from knowledger.editors import editor as E
    from knowledger.editors.apply import apply_deltas, restore_params, snapshot_params
    from knowledger.editors.corpus import Corpus
    from knowledger.editors.evaluate import aggregate, fact_metrics
    from knowledger.editors.hparams import preset_for
    from knowledger.editors.model_spec import spec_for
    from knowledger.editors.models import load_model, weights_sha256

    t_start = time.perf_counter()
    model, tok = load_model()
    sha = weights_sha256(model)
    spec, hp = spec_for(model), preset_for(model)
    layers = list(hp.layers)
    reqs, _ = load_requests(Path(a.data), a.n, a.offset)
    memo = {}
    real_opt = E.optimise_values

    def shared_values(model_, tok_, spec_, requests, hp_, contexts, **kw):
        k = (id(requests), kw.get("pmet"), hp_.early_stop_loss)
        if k not in memo:
            memo[k] = real_opt(model_, tok_, spec_, requests, hp_, contexts, **kw)
        return memo[k]
    E.optimise_values = shared_values

    sources = {"wikitext": Corpus.from_path(a.wikitext)}
    t = time.perf_counter()
    sources["sampled"] = Corpus.sampled(model, tok, a.sampled_max, weights_sha=sha)
    sample_s = time.perf_counter() - t
    moments = {}
    for name, corpus in sources.items():
        counts = [c for c in a.tokens if name != "sampled" or c <= a.sampled_max]
        moments[name] = snapshots(model, tok, spec, layers, corpus, counts)
    names = [spec.weight_name(l) for l in layers]
    saved = snapshot_params(model, names)
    base = aggregate(fact_metrics(model, tok, reqs))
    rows = [dict(source="none", tokens=0, editor="none", **base)]
    from knowledger.editors.fileio import atomic_write_text
    command = "python bench/stats_tokens.py " + " ".join(sys.argv[1:])

    def write():  # after every row: a run stopped early still leaves its points
        out = dict(command=command, facts=dict(file=a.data, n=len(reqs), offset=a.offset), layers=layers,
                   sample_s=round(sample_s, 1), total_s=round(time.perf_counter() - t_start, 1),
                   rows=rows, provenance=provenance())
        atomic_write_text(a.out, json.dumps(out, indent=1) + "\n")

    write()
    for src, by_count in moments.items():
        for count, C in sorted(by_count.items()):
            for ed in a.editors:
                t = time.perf_counter()
                editor = E.Editor(model, tok, hp, method=ed, second_moments=C, weights_sha=sha)
                try:
                    res = editor.compute(reqs)
                    apply_deltas(model, spec, res.deltas)
                    m = aggregate(fact_metrics(model, tok, reqs))
                except Exception as e:  # a singular C at tiny counts is a result, not a crash
                    m = dict(error=f"{type(e).__name__}: {e}")
                finally:
                    restore_params(model, saved)
                rows.append(dict(source=src, tokens=count, editor=ed, seconds=round(time.perf_counter() - t, 1),
                                 load_avg=provenance()["load_avg"], **m))
                log.info("%s", rows[-1])
                write()


if __name__ == "__main__":
    main()
