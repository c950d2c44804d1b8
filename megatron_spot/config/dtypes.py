"""The one table of training / checkpoint precisions: our short names, torch dtypes, the names
Hugging Face writes in config.json, and bytes per element.

Every place that turns "bf16" into a torch dtype (or back, or into a config.json torch_dtype, or into a
byte count for the memory model) reads it from here, so adding a precision is one edit.
"""
from __future__ import annotations

import torch

# short name -> torch dtype (the precisions Megatron-Core trains and our checkpoints store)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# short name -> Hugging Face config.json "torch_dtype"
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# spellings users and HF configs use for the same precisions
DTYPE_ALIASES = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16"}
# bytes per element of activations/weights stored in that precision; fp8 training keeps bf16 activations
# between layers, which is what the analytical memory model counts
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}


def normalize_dtype(name: str, field: str = "dtype") -> str:
    """'bfloat16' / 'BF16' / 'half' ... -> one of TORCH_DTYPES's keys; ValueError naming `field` otherwise."""
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TORCH_DTYPES:
        raise ValueError(f"{field} {name!r} is not supported; choose one of {', '.join(TORCH_DTYPES)}")
    return key


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[normalize_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (KeyError for dtypes we do not train in)."""
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]
