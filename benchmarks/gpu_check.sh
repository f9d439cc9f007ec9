#!/usr/bin/env bash
# The engine's GPU checks, meant to take under 5 minutes on one H100 or H200 (not yet run on one). The device
# machine has torch and transformers installed and no package registry. First the engine's CUDA tests (continuous
# batching with per-row adapters, a training engine's graphs across a change of v, each replayed graph against
# the same step run eagerly), then the engine benchmark: random weights of the default model's shape, bf16,
# 64 rows x 64 greedy tokens, ordinary steps and CUDA graphs side by side.
#
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if python -c "import pytest" 2>/dev/null; then
    timeout 120 python -m pytest -q -p no:cacheprovider tests/test_engine.py -k gpu
else
    echo "pytest is not installed here: the CUDA tests are skipped"
fi
timeout 180 python benchmarks/bench.py engine --device cuda --layers 24 --gen-batch 64 --new-tokens 64 \
    --adapters 1000 --reps 3 --graphs
