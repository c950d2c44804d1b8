"""Post-training quantization of trained checkpoints (any registered family) with NVIDIA ModelOpt, exported as HF folders."""
from megatron_spot.quantization.export import (
    FORMATS,
    QuantizationError,
    calibration_prompts,
    check_format,
    quantize_and_export,
)
from megatron_spot.quantization.reference import load_fp8_reference

__all__ = ["FORMATS", "QuantizationError", "calibration_prompts", "check_format", "quantize_and_export",
           "load_fp8_reference"]
