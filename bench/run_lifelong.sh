#!/usr/bin/env bash
# Reproduces bench/results/counterfact-val-500/ (docs/lifelong.md, docs/benchmarks.md):
#  - N (default 500) CounterFact-val facts in sequential batches of 100 for MEMIT, EMMET, AlphaEdit,
#    ENCORE and the scheduler's automatic choice, with curves (all facts so far, held-out
#    perplexity, norm growth) after every batch;
#  - 100 facts in 100 sequential batches of 1 for EMMET and MEMIT (auto is EMMET below 300 edits);
#  - the unedited model on the same facts (the baseline row);
# then the Markdown tables, bar charts and curve plots.
#   bash bench/run_lifelong.sh          # from the repository root, ../shared/data beside it
set -euo pipefail
DATA=${DATA:-../shared/data/counterfact/counterfact-val.json}
CORPUS=${CORPUS:-../shared/data/corpus/wiki.test.raw}
OUT=${OUT:-bench/results/counterfact-val-500}
N=${N:-500}
EDITORS=${EDITORS:-"memit emmet alphaedit encore auto"}
B1_EDITORS=${B1_EDITORS:-"emmet memit"}
mkdir -p "$OUT/b100" "$OUT/b1"
knowledger bench counterfact --data "$DATA" --n "$N" --editor none --corpus "$CORPUS" --out "$OUT/b100/baseline.json"
for ed in $EDITORS; do
  knowledger bench counterfact --data "$DATA" --n "$N" --batch-size 100 --editor "$ed" \
    --corpus "$CORPUS" --curve-points 5 --out "$OUT/b100/$ed.json" "$@"
done
knowledger bench counterfact --data "$DATA" --n 100 --editor none --corpus "$CORPUS" --out "$OUT/b1/baseline.json"
for ed in $B1_EDITORS; do
  knowledger bench counterfact --data "$DATA" --n 100 --batch-size 1 --editor "$ed" \
    --corpus "$CORPUS" --curve-points 10 --out "$OUT/b1/$ed.json" "$@"
done
for d in b100 b1; do
  knowledger bench table "$OUT/$d"/*.json --md "$OUT/$d/table.md" --png "$OUT/$d/metrics.png" \
    --curves "$OUT/$d/curves.png"
done
