"""Errors a user can act on (bad paths, wrong tensors, corrupt files, layouts that do not fit)."""
from megatron_spot.config.loader import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint problem the user can fix; the message names the file, tensor or setting."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (no space left, an unwritable folder): nothing of it was
    published, the previous checkpoint is still `latest`; the message says what failed and where."""
