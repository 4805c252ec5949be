#!/usr/bin/env bash
# End-to-end demo on the offline SmolLM2-135M and the offline 1911 Britannica text (2-core CPU: a few minutes):
# CLP mask search -> endpoint LoRA recovery -> vanilla export -> dense vs pruned vs recovered perplexity
# -> zero-shot accuracy retention on the first rows of PIQA and ARC-Easy (offline lm-eval tasks, scored in bf16).
#   make demo            (or: PYTHON=.venv/bin/python bash scripts/demo.sh)
# Shorter or longer: DEMO_SEARCH_STEPS=40 DEMO_RECOVERY_STEPS=40 DEMO_ACC_ROWS=200 make demo (DEMO_ACC_ROWS=0: skip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${DEMO_OUT:-runs/demo}
SEARCH_STEPS=${DEMO_SEARCH_STEPS:-40}
RECOVERY_STEPS=${DEMO_RECOVERY_STEPS:-40}
ACC_ROWS=${DEMO_ACC_ROWS:-200}
RUNS="$OUT/runs"
mkdir -p "$OUT"
quiet() { grep -vE "it/s\]|examples/s\]|^\s*$" || true; }  # progress bars only: warnings are filtered in lit_prune/_warnings.py
step() { echo "== $* [${SECONDS}s]"; }  # elapsed seconds at the start of each step

step "1. offline assets (converted once, then cached)"
$PY -m lit_prune assets

step "2. dense perplexity"
$PY -m lit_prune validate -c configs/eval_smollm2.yaml --trainer.logger.init_args.save_dir="$RUNS" \
  --trainer.logger.init_args.name=dense 2>&1 | tee "$OUT/dense.log" | quiet

step "3. CLP mask search: 8 of 30 layers, $SEARCH_STEPS steps (weights frozen, only the concave gate trains)"
rm -rf "$RUNS/clp_smollm2/demo"
$PY -m lit_prune fit -c configs/clp_smollm2.yaml --trainer.max_steps="$SEARCH_STEPS" --trainer.limit_val_batches=0 \
  --trainer.logger.init_args.save_dir="$RUNS" --trainer.logger.init_args.version=demo 2>&1 | quiet
MASK="$RUNS/clp_smollm2/demo/mask.json"
cat "$MASK"

step "4. pruned perplexity (the mask applied by real surgery)"
$PY -m lit_prune validate -c configs/eval_smollm2.yaml --model.init_args.mask="$MASK" \
  --trainer.logger.init_args.save_dir="$RUNS" --trainer.logger.init_args.name=pruned 2>&1 | tee "$OUT/pruned.log" | quiet

step "5. endpoint LoRA recovery: $RECOVERY_STEPS steps, LoRA only next to the cut, merged into a vanilla checkpoint"
rm -rf "$RUNS/clp_endpoint_smollm2/demo"
$PY -m lit_prune fit -c configs/clp_endpoint_smollm2.yaml --model.init_args.mask="$MASK" \
  --trainer.max_steps="$RECOVERY_STEPS" --trainer.limit_val_batches=0 \
  --trainer.logger.init_args.save_dir="$RUNS" --trainer.logger.init_args.version=demo 2>&1 | quiet
RECOVERED="$RUNS/clp_endpoint_smollm2/demo/pruned"
# The paths the README and `evaluate --help` use: $OUT/mask.json and $OUT/pruned (a link into the run folder).
cp "$MASK" "$OUT/mask.json"
ln -sfn "runs/clp_endpoint_smollm2/demo/pruned" "$OUT/pruned"
echo "mask: $OUT/mask.json  recovered model: $OUT/pruned -> $RECOVERED"

step "6. recovered perplexity (the exported folder, loaded like any HF checkpoint)"
$PY -m lit_prune validate -c configs/eval_smollm2.yaml --model.init_args.pretrained="$RECOVERED" \
  --trainer.logger.init_args.save_dir="$RUNS" --trainer.logger.init_args.name=recovered 2>&1 \
  | tee "$OUT/recovered.log" | quiet

step "7. the recovered model loads with plain transformers and generates"
$PY scripts/generate.py "$RECOVERED" "The history of England"

if [ "$ACC_ROWS" -gt 0 ]; then
  step "8. zero-shot accuracy, dense vs recovered: first $ACC_ROWS rows of PIQA and ARC-Easy (validation), bf16"
  $PY -m lit_prune evaluate --models dense=offline:smollm2-135m recovered="$RECOVERED" --tasks piqa arc_easy_val \
    --limit "$ACC_ROWS" --dtype bfloat16 --batch-size 16 --out "$OUT/accuracy" --overwrite >"$OUT/accuracy.log" 2>&1 \
    || { tail -n 5 "$OUT/accuracy.log"; exit 1; }
fi

step "summary (held-out Britannica, 16 x 256 tokens)"
$PY scripts/summarize_logs.py "$OUT/dense.log" "$OUT/pruned.log" "$OUT/recovered.log"
if [ "$ACC_ROWS" -gt 0 ]; then
  $PY - "$OUT/accuracy/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
dense, rec = r["models"]["dense"], r["models"]["recovered"]
num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731 (no retention when the dense accuracy is 0)
print(f"{'accuracy (bf16)':<20} {'dense':>15} {'recovered':>15} {'retention':>10} {'paired diff':>16}")
for task, res in dense["tasks"].items():
    other, d = rec["tasks"][task], rec["paired"]["tasks"][task]
    print(f"{task + ' (' + str(res['n']) + ' rows)':<20} {res['value']:>7.3f} ± {res['stderr']:.3f} "
          f"{other['value']:>7.3f} ± {other['stderr']:.3f} {num(rec['retention']['tasks'][task]):>10} "
          f"{d['diff']:>+7.3f} ± {d['stderr']:.3f}{'' if d['distinguishable'] else ' (n.s.)'}")
ret = rec["retention"]
print(f"accuracy retention: mean of ratios {num(ret['mean_of_ratios'])}, ratio of means {num(ret['ratio_of_means'])}")
PY
fi
echo "TensorBoard: tensorboard --logdir $RUNS   (demo: ${SECONDS}s)"
