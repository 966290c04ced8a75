#!/usr/bin/env bash
# The AlphaEdit / ENCORE settings probe (docs/lifelong.md): 100 counterfact-TRAIN facts (offset 2000,
# never used for reporting) in one batch of 100, per candidate setting.
#   bash bench/tune_lifelong.sh      # from the repository root, ../shared/data beside it
set -euo pipefail
DATA=${DATA:-../shared/data/counterfact/counterfact-train.json}
CORPUS=${CORPUS:-../shared/data/corpus/wiki.test.raw}
OUT=${OUT:-bench/results/tuning-lifelong}
mkdir -p "$OUT"
common=(--data "$DATA" --offset 2000 --n 100 --batch-size 100 --corpus "$CORPUS" --curve-points 1 --heldout-tokens 4096)
knowledger bench counterfact "${common[@]}" --editor alphaedit --set alphaedit_null_scale=max --out "$OUT/alphaedit-max-0.02.json"
knowledger bench counterfact "${common[@]}" --editor encore --out "$OUT/encore-alpha-0.1.json"
knowledger bench counterfact "${common[@]}" --editor alphaedit --out "$OUT/alphaedit-energy-0.02.json"
knowledger bench counterfact "${common[@]}" --editor memit --out "$OUT/memit.json"
knowledger bench counterfact "${common[@]}" --editor none --out "$OUT/baseline.json"
knowledger bench table "$OUT"/*.json --md "$OUT/table.md"
