#!/usr/bin/env bash
# End-to-end demo on the offline SmolLM2-135M and the offline 1911 Britannica text (2-core CPU: a few minutes).
#   make demo            (or: PYTHON=.venv/bin/python bash scripts/demo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${DEMO_OUT:-runs/demo}
MASK=configs/masks/smollm2_drop_13_19.json
mkdir -p "$OUT"

echo "== 1. offline assets (converted once, then cached)"
$PY -m lit_prune assets

echo "== 2. dense perplexity"
$PY -m lit_prune validate -c configs/eval_smollm2.yaml --trainer.logger.init_args.name=dense 2>&1 | tee "$OUT/dense.log"

echo "== 3. drop a contiguous block by an explicit mask and export a vanilla checkpoint"
$PY -m lit_prune export --model offline:smollm2-135m --mask "$MASK" --out "$OUT/pruned" --overwrite

echo "== 4. pruned perplexity"
$PY -m lit_prune validate -c configs/eval_smollm2.yaml --model.init_args.pretrained="$OUT/pruned" \
  --trainer.logger.init_args.name=pruned 2>&1 | tee "$OUT/pruned.log"

echo "== 5. the exported model loads with plain transformers and generates"
$PY scripts/generate.py "$OUT/pruned" "The history of England"

echo "== summary"
$PY scripts/summarize_logs.py "$OUT/dense.log" "$OUT/pruned.log"
