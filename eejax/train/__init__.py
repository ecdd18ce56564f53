"""The one trainer: state, data-parallel step, resumable loop, checkpoints, metrics, optimizers."""
from eejax.train.arrays import ArrayIterator, one_device_mesh
from eejax.train.checkpoint import (CHECKSUM_FILE, CheckpointError, Checkpointer, CheckpointMismatchError,
                                    DiskFullError, NoGoodCheckpointError, Restored, abstract_like)
from eejax.train.distributed import maybe_initialize
from eejax.train.metrics import MetricsWriter, Throughput, read_metrics
from eejax.train.optim import (OPTIMIZERS, SCHEDULES, ParamEmaState, default_optim_config, ema_params, learning_rate,
                               make_optimizer, make_schedule, param_ema, trainable_labels,
                               validate_optim_config)
from eejax.train.trainer import MASK_KEY, NonFiniteLossError, StepContext, Trainer, TrainState

__all__ = [
    "CHECKSUM_FILE", "CheckpointError", "Checkpointer", "CheckpointMismatchError", "DiskFullError",
    "NoGoodCheckpointError", "Restored", "abstract_like",
    "MetricsWriter", "Throughput", "read_metrics", "OPTIMIZERS",
    "SCHEDULES", "ParamEmaState", "default_optim_config", "ema_params", "param_ema", "learning_rate",
    "make_optimizer", "make_schedule", "trainable_labels", "validate_optim_config",
    "MASK_KEY", "NonFiniteLossError", "StepContext", "Trainer", "TrainState", "maybe_initialize",
    "ArrayIterator", "one_device_mesh",
]
