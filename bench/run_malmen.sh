#!/usr/bin/env bash
# Reproduces bench/results/malmen/ (docs/benchmarks.md, "MALMEN"):
#  1. meta-trains a hyper-network on the first LIMIT (default 4,200) CounterFact-TRAIN facts, the
#     last 200 of them held out for validation, for MINUTES (default 40) of wall time on this CPU;
#  2. edits N (default 1,000) CounterFact-VAL facts (disjoint from training) in ONE batch with it,
#     with MEMIT on the same facts in one batch, and the unedited model as the baseline row;
#  3. writes the Markdown table and bar chart.
#   bash bench/run_malmen.sh          # from the repository root, ../shared/data beside it
# SKIP_TRAIN=1 reuses an existing $NET.
set -euo pipefail
TRAIN=${TRAIN:-../shared/data/counterfact/counterfact-train.json}
DATA=${DATA:-../shared/data/counterfact/counterfact-val.json}
CORPUS=${CORPUS:-../shared/data/corpus/wiki.test.raw}
NET=${NET:-runs/malmen-cf}
OUT=${OUT:-bench/results/malmen/counterfact-val-1000}
N=${N:-1000}
LIMIT=${LIMIT:-4200}
MINUTES=${MINUTES:-40}
if [ -z "${SKIP_TRAIN:-}" ]; then
  knowledger train-malmen --data "$TRAIN" --out "$NET" --limit "$LIMIT" --batch 64 --val-facts 200 \
    --val-every 100 --steps 2000 --max-minutes "$MINUTES"
fi
mkdir -p "$OUT"
cp "$NET/training.json" "$NET/config.json" "$NET/training.png" "$OUT/../"
knowledger bench counterfact --data "$DATA" --n "$N" --editor none --corpus "$CORPUS" --out "$OUT/baseline.json"
knowledger bench counterfact --data "$DATA" --n "$N" --batch-size "$N" --editor malmen --hypernet "$NET" \
  --corpus "$CORPUS" --curve-points 1 --out "$OUT/malmen.json"
knowledger bench counterfact --data "$DATA" --n "$N" --batch-size "$N" --editor memit \
  --corpus "$CORPUS" --curve-points 1 --out "$OUT/memit.json"
knowledger bench table "$OUT"/*.json --md "$OUT/table.md" --png "$OUT/metrics.png"
