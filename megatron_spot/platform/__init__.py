"""Platform start-up (distributed, parallel state, device, seeding) and the CPU compatibility layer."""
from megatron_spot.platform.distributed import (
    RuntimeInfo,
    has_cuda,
    init_process_group,
    initialize,
    seed_everything,
    shutdown,
    validate_parallel_layout,
)

__all__ = ["RuntimeInfo", "has_cuda", "init_process_group", "initialize", "seed_everything", "shutdown",
           "validate_parallel_layout"]
