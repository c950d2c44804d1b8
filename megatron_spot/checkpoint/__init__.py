"""Checkpoints: HF Qwen3 <-> Megatron-Core dist_checkpointing conversion and model checkpoints
(hf_convert), and the atomic save/load of the whole training state (training_state)."""
