"""Platform start-up (distributed, parallel state, device, seeding) and the CPU compatibility layer."""
from megatron_spot.platform.device import (
    accelerator_rng_state,
    compute_capability,
    current_device,
    device_name,
    has_cuda,
    move_to_device,
    peak_memory_bytes,
    reset_peak_memory,
    set_accelerator_rng_state,
)
from megatron_spot.platform.layout import Layout
from megatron_spot.platform.distributed import (
    RuntimeInfo,
    init_process_group,
    initialize,
    patient_barrier,
    patient_group,
    seed_everything,
    shutdown,
    validate_parallel_layout,
)

__all__ = ["accelerator_rng_state", "compute_capability", "current_device", "device_name", "move_to_device",
           "peak_memory_bytes", "reset_peak_memory", "set_accelerator_rng_state", "RuntimeInfo", "has_cuda", "init_process_group", "initialize", "patient_barrier", "patient_group", "seed_everything", "shutdown",
           "validate_parallel_layout", "Layout"]
