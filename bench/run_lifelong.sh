#!/usr/bin/env bash
# Reproduces bench/results/counterfact-val-500/ (docs/benchmarks.md, docs/lifelong.md):
#  - N (default 500) CounterFact-val facts in 5 sequential batches of 100 for MEMIT, EMMET,
#    AlphaEdit and ENCORE, with curves (all facts so far, held-out perplexity, norm growth) after
#    every batch, and the unedited model on the same facts (the baseline row);
#  - the scheduler's automatic choice on the first N_AUTO (default 300) of them;
#  - optionally (B1_EDITORS="emmet memit") 100 facts in batches of 1;
# then the Markdown table, bar chart and curve plot.
#   bash bench/run_lifelong.sh          # from the repository root, ../shared/data beside it
set -euo pipefail
DATA=${DATA:-../shared/data/counterfact/counterfact-val.json}
CORPUS=${CORPUS:-../shared/data/corpus/wiki.test.raw}
OUT=${OUT:-bench/results/counterfact-val-500}
N=${N:-500}
N_AUTO=${N_AUTO:-300}
EDITORS=${EDITORS:-"memit emmet alphaedit encore"}
B1_EDITORS=${B1_EDITORS:-""}
mkdir -p "$OUT/b100"
knowledger bench counterfact --data "$DATA" --n "$N" --editor none --corpus "$CORPUS" --out "$OUT/b100/baseline.json"
for ed in $EDITORS; do
  knowledger bench counterfact --data "$DATA" --n "$N" --batch-size 100 --editor "$ed" \
    --corpus "$CORPUS" --curve-points 5 --out "$OUT/b100/$ed.json" "$@"
done
knowledger bench counterfact --data "$DATA" --n "$N_AUTO" --batch-size 100 --editor auto \
  --corpus "$CORPUS" --curve-points 5 --out "$OUT/b100/auto-$N_AUTO.json" "$@"
knowledger bench table "$OUT/b100"/*.json --md "$OUT/b100/table.md" --png "$OUT/b100/metrics.png" \
  --curves "$OUT/b100/curves.png"
for ed in $B1_EDITORS; do
  mkdir -p "$OUT/b1"
  knowledger bench counterfact --data "$DATA" --n 100 --batch-size 1 --editor "$ed" \
    --corpus "$CORPUS" --curve-points 10 --out "$OUT/b1/$ed.json" "$@"
done
