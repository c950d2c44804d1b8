"""Checkpoints: HF Qwen3 <-> Megatron-Core dist_checkpointing conversion and model checkpoints
(hf_convert), and the atomic save/load of the whole training state (training_state).

Importing this package routes torch_dist's unpickling through safe_load's allow-lists, so no
checkpoint opened through megatron_spot can run code."""
from megatron_spot.checkpoint.safe_load import install as _install_safe_loading

_install_safe_loading()
