#!/usr/bin/env bash
# Every experiment of docs/reproduction.md, most decisive first, as resumable sweeps into OUT (default
# runs/). Rerun the same command to continue after a stop: finished runs are skipped, a run cut off
# resumes from its checkpoint. GSM8K reads $TINYLORA_GSM8K_DIR (train.jsonl, test.jsonl) or the hub.
#
#   bash experiments/queue.sh [OUT]
set -uo pipefail
OUT=${1:-runs}
sweep() {  # go on past failed runs (exit 1: recorded in results.csv); stop on Ctrl-C or a bad spec
    tinylora sweep "$@" --no-progress
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 1 ]; then exit $rc; fi
}
sweep experiments/param_curve.toml --out "$OUT/param_curve" --only '^algo=grpo,n-tie='  # GRPO, u=1, every rate
sweep experiments/steps.toml --out "$OUT/steps" --only 'n-tie=16$'       # 11 numbers for 100 steps
sweep experiments/ablations.toml --out "$OUT/ablations"                  # rank, tying, v dtype
sweep experiments/param_curve.toml --out "$OUT/param_curve" --only '^algo=sft,n-tie='   # SFT, u=1, every rate
sweep experiments/gsm8k.toml --out "$OUT/gsm8k"
sweep experiments/param_curve.toml --out "$OUT/param_curve"              # u=4, LoRA-XS, LoRA, full
sweep experiments/steps.toml --out "$OUT/steps"                          # 1 and 168 numbers for 100 steps
