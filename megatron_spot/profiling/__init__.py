"""Throughput profiling: the analytical FLOPs/memory/bubble model, known-GPU peaks, the profiling runner."""
from megatron_spot.profiling.analytical import (
    StepShape,
    activation_bytes,
    bubble_fraction,
    bubble_share_of_step,
    korthikanti_gpt_layer_bytes,
    layer_activation_bytes,
    memory_per_rank,
    model_state_bytes,
    predict,
    stage_parameters,
    step_flops,
)
from megatron_spot.profiling.flops import forward_flops_per_token, matmul_params_per_token, train_flops_per_token
from megatron_spot.profiling.hardware import GPU_PEAK_TFLOPS, GPUS, gpu_spec, measure_cpu_matmul_tflops, peak_tflops

__all__ = [
    "StepShape", "activation_bytes", "bubble_fraction", "bubble_share_of_step", "korthikanti_gpt_layer_bytes",
    "layer_activation_bytes", "memory_per_rank", "model_state_bytes", "predict", "stage_parameters", "step_flops",
    "forward_flops_per_token", "matmul_params_per_token", "train_flops_per_token", "GPU_PEAK_TFLOPS", "GPUS",
    "gpu_spec", "measure_cpu_matmul_tflops", "peak_tflops",
]
