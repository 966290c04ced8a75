#!/usr/bin/env bash
# Reproduces bench/results/counterfact-val-100/: N CounterFact-val facts edited in batches of
# 1, 10 and 100 (lifelong: batches applied one after another), for each editor, plus the unedited
# model as the baseline row; then one Markdown table and one PNG.
#   bash bench/run_counterfact.sh            # from the repository root, ../shared/data beside it
set -euo pipefail
DATA=${DATA:-../shared/data/counterfact/counterfact-val.json}
CORPUS=${CORPUS:-../shared/data/corpus/wiki.test.raw}
OUT=${OUT:-bench/results/counterfact-val-100}
N=${N:-100}
EDITORS=${EDITORS:-"emmet memit pmet"}
BATCHES=${BATCHES:-"1 10 100"}
mkdir -p "$OUT"
knowledger bench counterfact --data "$DATA" --n "$N" --editor none --out "$OUT/baseline.json"
for ed in $EDITORS; do
  for b in $BATCHES; do
    knowledger bench counterfact --data "$DATA" --n "$N" --batch-size "$b" --editor "$ed" \
      --corpus "$CORPUS" --out "$OUT/$ed-b$b.json" "$@"
  done
done
knowledger bench counterfact --data "$DATA" --n "$N" --batch-size 1 --editor rome \
  --corpus "$CORPUS" --out "$OUT/rome-b1.json" "$@"
knowledger bench table "$OUT"/*.json --md "$OUT/table.md" --png "$OUT/metrics.png"
