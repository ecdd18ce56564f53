"""The one trainer: state, data-parallel step, resumable loop, checkpoints, metrics, optimizers."""
from eejax.train.checkpoint import Checkpointer, Restored, abstract_like
from eejax.train.distributed import maybe_initialize
from eejax.train.metrics import MetricsWriter, Throughput, read_metrics
from eejax.train.optim import (OPTIMIZERS, SCHEDULES, ParamEmaState, default_optim_config, ema_params, learning_rate,
                               make_optimizer, make_schedule, param_ema, trainable_labels)
from eejax.train.trainer import MASK_KEY, NonFiniteLossError, Trainer, TrainState

__all__ = [
    "Checkpointer", "Restored", "abstract_like", "MetricsWriter", "Throughput", "read_metrics", "OPTIMIZERS",
    "SCHEDULES", "ParamEmaState", "default_optim_config", "ema_params", "param_ema", "learning_rate",
    "make_optimizer", "make_schedule", "trainable_labels",
    "MASK_KEY", "NonFiniteLossError", "Trainer", "TrainState", "maybe_initialize",
]
