#!/usr/bin/env bash
# Single node: score reference log-probs, then train, with one recipe.
#   examples/launch_single_node.sh examples/qwen3_8b_spot.yaml [key=value ...]
# One rank per GPU (NPROC, default: every GPU nvidia-smi lists); a recipe whose world: states another size
# (world.nodes x world.gpus_per_node) stops at start-up: override it, e.g. world.gpus_per_node=4.
# A rank that dies or hangs (run.collective_timeout_s, run.step_timeout_s) fails the group; torchrun then
# restarts it up to MAX_RESTARTS times, and run.load=auto resumes from the newest complete checkpoint of
# run.output_dir (set run.save_interval: a restart repeats the steps since the last checkpoint).
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [key=value ...]}; shift
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
MAX_RESTARTS=${MAX_RESTARTS:-3}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets TP communication overlap compute in Megatron-Core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# a fresh key-value store for every restart: torchrun's shared store keeps the dead group's keys, and
# the restarted group would fail to connect (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
torchrun --standalone --nproc-per-node "$NPROC" tools/score_logprobs.py --config "$RECIPE" "$@"
torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
  -m megatron_spot.train --config "$RECIPE" run.load=auto "$@"
