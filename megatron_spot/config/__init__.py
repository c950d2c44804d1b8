"""Run configuration: dataclasses, YAML loading and key=value overrides."""
from megatron_spot.config.loader import ConfigError, apply_overrides, dump_config, from_dict, load_config, to_dict
from megatron_spot.config.schema import (
    DataConfig,
    LossConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    RunConfig,
    TrainConfig,
    WorldConfig,
)

__all__ = [
    "ConfigError", "apply_overrides", "dump_config", "from_dict", "load_config", "to_dict",
    "DataConfig", "LossConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig", "PrecisionConfig",
    "RecomputeConfig", "RunConfig", "TrainConfig", "WorldConfig",
]
