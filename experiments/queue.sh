#!/usr/bin/env bash
# Every sweep of docs/reproduction.md, most decisive first, as resumable sweeps into OUT (default
# runs/, relative to the repository). Rerun the same command to continue after a stop: finished runs are
# skipped, a run cut off resumes from its checkpoint. A sweep with failed runs does not stop the queue;
# Ctrl-C or kill stops it and the sweep in flight. GSM8K reads $TINYLORA_GSM8K_DIR or the hub. The random-direction
# control runs afterwards on the runs `progress.py save` keeps (experiments/random_direction.py).
#
#   bash experiments/queue.sh [OUT]
#
# On a fresh machine, `python experiments/progress.py restore OUT` first continues the committed study
# (finished runs from docs/reproduction/*.csv, runs cut off from experiments/progress/) instead of rerunning it.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs}
child=""
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait; exit 130' INT TERM
sweep() {
    tinylora sweep "$@" --no-progress &
    child=$!
    wait "$child"
    local rc=$?
    child=""
    if [ $rc -ge 128 ]; then exit $rc; fi  # interrupted or killed: stop here, rerun to continue
}
sweep experiments/scale.toml --out "$OUT/scale"                          # 13 numbers at 1.5B vs 11 at 0.5B, with controls
sweep experiments/dynamic_sampling.toml --out "$OUT/dynamic_sampling"    # DAPO's filter vs plain GRPO, same rollouts
sweep experiments/scale_curve.toml --out "$OUT/scale_curve" --batched \
    --only '^(?!.*method=lora)|algo=grpo,lr=0.0003,method=lora|algo=sft,lr=0.001,method=lora'  # the curve; LoRA at 0.5B's best rates
sweep experiments/gsm8k_scale.toml --out "$OUT/gsm8k_scale"             # GSM8K at 1.5B, SFT then GRPO (many hours)
sweep experiments/scale_curve.toml --out "$OUT/scale_curve" --batched    # LoRA's other rates at 1.5B
sweep experiments/param_curve.toml --out "$OUT/param_curve" --only '^algo=grpo,n-tie=[^,]+,lr=[^,]+$'  # GRPO, u=1, every rate
sweep experiments/steps.toml --out "$OUT/steps" --only 'n-tie=16'        # 11 numbers for 100 steps
sweep experiments/seeds.toml --out "$OUT/seeds" --only 'seed=[01]$'      # GRPO and SFT at 11 and 168 numbers, second seed
sweep experiments/ablations.toml --out "$OUT/ablations" --only 'seed=0'  # rank, tying, v dtype: first seed
sweep experiments/seeds.toml --out "$OUT/seeds"                          # and the third
sweep experiments/ablations.toml --out "$OUT/ablations"                  # and the second
sweep experiments/param_curve.toml --out "$OUT/param_curve" --only '^algo=sft,n-tie=[^,]+,lr=[^,]+$'   # SFT, u=1, every rate
sweep experiments/gsm8k.toml --out "$OUT/gsm8k" --only 'lr=0.03'         # hours: 320-token rollouts
sweep experiments/steps.toml --out "$OUT/steps"                          # 1 and 168 numbers for 100 steps
sweep experiments/param_curve.toml --out "$OUT/param_curve" --only '^(?!.*method=full)'  # u=4, LoRA-XS, LoRA
sweep experiments/param_curve.toml --out "$OUT/param_curve"              # full fine-tuning (GB checkpoints: finish in one sitting)
sweep experiments/gsm8k.toml --out "$OUT/gsm8k"                          # GSM8K at 1e-2 (hours)
