"""How a run executes: its precision policy, distribution strategy, optimizer and
learning-rate schedule."""

from __future__ import annotations

import contextlib
import logging

import keras

from medseg.config import STRATEGIES, Config
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


#: First port of the Slurm tasks on a node (``MEDSEG_SLURM_PORT``); a node's tasks
#: take the ports from here up.
SLURM_PORT = 8888


def distribution_strategy(name: str = "auto", devices=None):
    """The ``tf.distribute`` strategy ``name`` asks for, created before any other
    TensorFlow op.

    Args:
        name: ``none`` (one device), ``mirrored`` (one replica per device of this
            machine, gradients all-reduced), ``multiworker`` (mirrored over the
            workers of a cluster that ``TF_CONFIG`` or a Slurm job step describes),
            or ``auto``: multiworker when ``TF_CONFIG`` is set or the Slurm step has
            several tasks, mirrored over several devices (those of ``devices``, else
            the GPUs), else none.
        devices: the devices of this machine to train on, as GPU numbers (``"0"``)
            or TensorFlow device names (``"/cpu:1"``); ``None``: all GPUs (else the
            CPU).
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    names = device_names(devices or ())
    if name == "auto":
        if cluster_environment() is not None:
            name = "multiworker"
        elif len(names) > 1 or (
            not names and len(tf.config.list_physical_devices("GPU")) > 1
        ):
            name = "mirrored"
        else:
            name = "none"
    if name == "multiworker":
        if names:
            raise ConfigError(
                "--devices is for one machine; a worker of a cluster trains on the "
                "GPUs its scheduler gives it"
            )
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster_resolver()
        )
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=names or None)
    if len(names) > 1:
        raise ConfigError(
            f"strategy none trains on one device, got {len(names)}: "
            f"{', '.join(names)} (use --strategy mirrored)"
        )
    if names:
        return tf.distribute.OneDeviceStrategy(names[0])
    return tf.distribute.get_strategy()


def device_names(devices) -> list[str]:
    """TensorFlow device names of ``devices``: a number is a GPU's."""
    names = []
    for device in devices:
        text = str(device).strip()
        if text.isdigit():
            names.append(f"/gpu:{int(text)}")
        elif text.lower().lstrip("/").startswith(("gpu:", "cpu:", "device:")):
            names.append("/" + text.lstrip("/"))
        else:
            raise ConfigError(
                f"device {text!r}: expected a GPU number (0, 1, ...) or a "
                "TensorFlow device name (/gpu:0, /cpu:0)"
            )
    return names


def cluster_environment() -> str | None:
    """What describes this process's cluster: ``"TF_CONFIG"``, ``"slurm"`` (a job
    step of several tasks), or ``None``."""
    import os

    if os.environ.get("TF_CONFIG"):
        return "TF_CONFIG"
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if os.environ.get("SLURM_PROCID") and tasks and int(tasks) > 1:
        return "slurm"
    return None


def cluster_resolver():
    """TensorFlow's resolver of this process's cluster: from ``TF_CONFIG``, else
    from the Slurm job step (its tasks, nodes and tasks per node; a node's tasks
    listen from ``MEDSEG_SLURM_PORT`` up, the node's GPUs, ``SLURM_GPUS_ON_NODE``,
    shared out among them)."""
    import os

    import tensorflow as tf

    resolvers = tf.distribute.cluster_resolver
    where = cluster_environment()
    if where is None:
        raise ConfigError(
            "strategy multiworker needs a cluster: set TF_CONFIG, or run one task "
            "per worker in a Slurm job step (srun)"
        )
    if where == "TF_CONFIG":
        return resolvers.TFConfigClusterResolver()
    port = int(os.environ.get("MEDSEG_SLURM_PORT") or SLURM_PORT)
    gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
    if gpus:
        return resolvers.SlurmClusterResolver(port_base=port, gpus_per_node=gpus)
    # the resolver lists a node's tasks only as far as it has GPUs to hand them: on
    # CPU nodes, give it one per task and leave CUDA_VISIBLE_DEVICES alone
    return resolvers.SlurmClusterResolver(
        port_base=port,
        gpus_per_node=int(os.environ["SLURM_STEP_NUM_TASKS"]),
        gpus_per_task=1,
        auto_set_gpu=False,
    )


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
