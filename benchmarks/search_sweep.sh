#!/usr/bin/env bash
# Sweep of the search defaults on SmolLM2 (held-out KL vs the best contiguous window), one line per setting.
#   bash benchmarks/search_sweep.sh MODEL_DIR TEXT_FILE OUT_DIR
set -uo pipefail
MODEL=$1 TEXT=$2 OUT=${3:-results}
run() {  # name, extra args...
  local name=$1; shift
  python3 -m benchmarks.search_quality --model "$MODEL" --text "$TEXT" --ratios 0.2 0.25 --seq 256 --batch 8 \
    --calib-batches 4 --val-blocks 64 --steps 200 --skip-repro --out "$OUT/sweep_$name.json" "$@" 2>&1 \
    | grep -E "^\| 0\." | sed "s/^/$name /"
}
run clp_t1_lr0.3   --methods clp --clp-t0 1.0 --clp-lr 0.3
run clp_t0.5_lr0.3 --methods clp --clp-t0 0.5 --clp-lr 0.3
run clp_t2_lr0.3   --methods clp --clp-t0 2.0 --clp-lr 0.3
run clp_t1_lr0.1   --methods clp --clp-t0 1.0 --clp-lr 0.1
run e3_lr0.1_s2    --methods e3 --e3-lr 0.1 --e3-scale 2
run e3_lr0.02_s2   --methods e3 --e3-lr 0.02 --e3-scale 2
run e3_lr0.01_s4   --methods e3 --e3-lr 0.01 --e3-scale 4
run e3_lr0.03_s2_t0.5 --methods e3 --e3-lr 0.03 --e3-scale 2 --e3-t0 0.5 --e3-t1 0.05
