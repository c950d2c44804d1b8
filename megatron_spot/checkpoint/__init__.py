"""Checkpoints, model-agnostic (model facts come from the family registry, models/):

- model_checkpoint: the model checkpoint format (Megatron-Core dist_checkpointing + our metadata),
  collective save and load at any TP/PP/VPP;
- hf_convert: the HF <-> Megatron conversion driver (streams tensors, runs in a one-process world,
  single_process.py); safetensors_io: plain safetensors reads/writes;
- training_state: the atomic save/load of the whole training state; safe_load: the unpickling allow-lists.

Importing this package routes torch_dist's unpickling through safe_load's allow-lists, so no
checkpoint opened through megatron_spot can run code."""
from megatron_spot.checkpoint.safe_load import install as _install_safe_loading

_install_safe_loading()
