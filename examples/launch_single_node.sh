#!/usr/bin/env bash
# Single node: score reference log-probs, then train, with one recipe.
#   examples/launch_single_node.sh examples/qwen3_8b_spot.yaml [key=value ...]
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [key=value ...]}; shift
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets TP communication overlap compute in Megatron-Core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
torchrun --standalone --nproc-per-node "$NPROC" tools/score_logprobs.py --config "$RECIPE" "$@"
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_spot.train --config "$RECIPE" "$@"
