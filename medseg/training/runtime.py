"""How a run executes: its precision policy, distribution strategy, optimizer and
learning-rate schedule."""

from __future__ import annotations

import contextlib
import logging

import keras

from medseg.config import Config
from medseg.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="medseg")
class PolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``lr * (1 - step / total_steps) ** exponent`` (nnU-Net's poly schedule)."""

    def __init__(self, initial_learning_rate, total_steps, exponent=0.9):
        self.initial_learning_rate = initial_learning_rate
        self.total_steps = total_steps
        self.exponent = exponent

    def __call__(self, step):
        progress = keras.ops.minimum(
            keras.ops.cast(step, "float32") / self.total_steps, 1.0
        )
        return self.initial_learning_rate * keras.ops.power(
            1.0 - progress, self.exponent
        )

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "exponent": self.exponent,
        }


@contextlib.contextmanager
def config_errors():
    """Reports a ``ValueError`` raised while setting a run up as a :class:`ConfigError`
    (a setting that does not work), leaving input-file errors as they are."""
    try:
        yield
    except (ConfigError, InputFileError):
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def precision_policy(config: Config) -> str:
    """The Keras policy ``train.precision`` asks for here: ``auto`` is mixed float16
    on a GPU and float32 on a CPU. On a CPU, float16 falls back to float32 (a bundle
    trained on a GPU, fine-tuned on a laptop) and bfloat16 without AVX-512 is warned
    of; both with a warning."""
    import tensorflow as tf

    from medseg.inference.precision import SLOW_BFLOAT16, bfloat16_is_slow_here

    policy = config.train.precision
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if policy == "auto":
        return "mixed_float16" if gpu else "float32"
    if not gpu and policy == "mixed_float16":
        logger.warning(
            "train.precision mixed_float16 is for GPUs: on a CPU TensorFlow has no "
            "float16 kernel for 3D max pooling and float16 is no faster; training in "
            "float32"
        )
        return "float32"
    if policy == "mixed_bfloat16" and bfloat16_is_slow_here():
        logger.warning(
            "train.precision mixed_bfloat16: %s; auto or float32 trains faster here",
            SLOW_BFLOAT16,
        )
    return policy


def distribution_strategy():
    """MultiWorkerMirrored when ``TF_CONFIG`` describes a cluster, Mirrored over
    several local GPUs, else the default. Created before any other TensorFlow op."""
    import os

    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_index(strategy) -> tuple[int, int]:
    """``(index, count)`` of this worker; (0, 1) outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    index = resolver.task_id + (
        1 if resolver.task_type == "worker" and "chief" in spec else 0
    )
    return index, workers


def make_optimizer(config: Config, total_steps: int, progress=None):
    """The optimizer ``train`` asks for; with a time budget, its poly schedule
    follows ``progress``, the budget's spent fraction (a variable)."""
    from medseg.training.budget import BudgetPolyDecay

    train = config.train
    if train.lr_schedule != "poly":
        rate = train.learning_rate
    elif train.time_budget is not None:
        rate = BudgetPolyDecay(train.learning_rate, train.poly_exponent, progress)
    else:
        rate = PolyDecay(train.learning_rate, total_steps, train.poly_exponent)
    average = (
        {"use_ema": True, "ema_momentum": train.ema} if train.ema is not None else {}
    )
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(
            rate,
            momentum=train.momentum,
            nesterov=True,
            weight_decay=train.weight_decay or None,
            **average,
        )
    return keras.optimizers.Adam(
        rate, weight_decay=train.weight_decay or None, **average
    )


def has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
