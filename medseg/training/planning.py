"""Planning from the dataset fingerprint, as nnU-Net does: target spacing, patch size,
batch size for a memory budget. Values given in the config always win."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from medseg.bundle import window_of
from medseg.config import Config

logger = logging.getLogger(__name__)

#: Smallest batch nnU-Net trains with.
MIN_BATCH = 2
#: Cap on the batch: at most this fraction of all voxels of the dataset per step.
MAX_BATCH_FRACTION = 0.05
#: Memory budget on a CPU (the machine's RAM is shared with everything else).
CPU_MEMORY_GB = 4.0
#: Budget assumed for a GPU whose memory cannot be read.
GPU_FALLBACK_GB = 8.0


@dataclass(frozen=True)
class Plan:
    """The decisions, recorded in the bundle and printed before training."""

    target_spacing_mm: tuple[float, ...]
    median_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    memory_gb: float
    estimated_memory_gb: float
    num_classes: int
    in_channels: int
    #: a 2D network on 3D volumes: the axis of the preprocessed (RAS) volume it is cut
    #: along; ``patch_size`` is then the slice's, ``target_spacing_mm`` the volume's
    slice_axis: int | None = None

    @property
    def window(self) -> tuple[int, ...]:
        """The patch as a window over the preprocessed case: one voxel deep along the
        slice axis of a 2D network on 3D volumes."""
        return window_of(self.patch_size, self.slice_axis)

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }

    def describe(self) -> str:
        def fmt(values, spec=""):
            return " x ".join(format(v, spec) for v in values)

        slices = (
            ""
            if self.slice_axis is None
            else f" (2D slices across axis {self.slice_axis})"
        )
        return (
            f"plan: spacing {fmt(self.target_spacing_mm, '.3g')} mm, median case "
            f"{fmt(self.median_shape)}, patch {fmt(self.patch_size)}{slices}, batch "
            f"{self.batch_size}, {self.num_classes} classes, "
            f"{self.in_channels} channel(s); "
            f"estimated training memory {self.estimated_memory_gb:.2f} GB of "
            f"{self.memory_gb:.1f} GB"
        )


def slice_axis_for(spacing) -> int:
    """The axis a 2D network cuts a volume across, as nnU-Net's 2D configuration does:
    the one with the coarsest voxels (thick slices), the last of equals (axial slices
    of a RAS volume at isotropic spacing)."""
    spacing = np.asarray(spacing, dtype=float)
    return int(np.flatnonzero(np.isclose(spacing, spacing.max(), rtol=1e-3))[-1])


def default_memory_gb() -> float:
    """The first GPU's total memory in GB (from ``nvidia-smi``), or
    :data:`CPU_MEMORY_GB` without a GPU; 8 GB if a GPU's size cannot be read."""
    import subprocess

    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return CPU_MEMORY_GB
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return float(out.split()[0]) / 1024  # MiB -> GiB, close enough to GB here
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return GPU_FALLBACK_GB


def _check_batch_fits(config, batch, wanted, patch, needed_gb, memory_gb) -> None:
    """Refuses a batch that does not fit the memory budget, or that fits only by
    shrinking the patch below an eighth of the planned one (so small a patch sees
    too little of a case to learn from, and so large a batch never ends a step).

    Raises:
        ValueError: what to change.
    """
    size = " x ".join(map(str, patch))
    if needed_gb > memory_gb:
        raise ValueError(
            f"train.batch_size {batch} with a patch of {size} needs about "
            f"{needed_gb:.1f} GB, more than the {memory_gb:.1f} GB budget; give a "
            "smaller batch_size (or none, to plan it) or a larger train.memory_gb"
        )
    if config.train.batch_size is not None and math.prod(patch) * 8 < math.prod(wanted):
        raise ValueError(
            f"train.batch_size {batch} fits the {memory_gb:.1f} GB budget only with a "
            f"patch of {size} instead of {' x '.join(map(str, wanted))}; give a "
            "smaller batch_size (or none, to plan it) or a larger train.memory_gb"
        )


def _valid_sizes(model_cfg, depth: int, patch: list[int]) -> list[int]:
    """For an unpadded (``"valid"``) U-Net: each size of ``patch`` raised to the
    smallest input size the network takes."""
    from medseg.models import valid_unet_input_sizes

    options = model_cfg.options
    sizes = valid_unet_input_sizes(
        depth=depth,
        convs_per_level=int(options.get("convs_per_level", 2)),
        kernel_size=int(options.get("kernel_size", 3)),
        dilation=int(options.get("dilation", 1)),
        max_size=4 * max(patch) + 1024,
    )
    return [next(size for size in sizes if size >= n) for n in patch]


def _round_up(n: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(n / multiple)) * multiple)


def plan_training(
    config: Config, fingerprint: dict, *, memory_gb: float | None = None
) -> Plan:
    """Chooses what the config leaves open.

    * target spacing: the median spacing of the dataset;
    * a 2D network on 3D volumes is trained on slices across the axis of the coarsest
      target spacing (:func:`slice_axis_for`), its patch planned from the other two;
    * patch size: the median case shape at that spacing, rounded up to a multiple of
      ``2 ** depth`` and shrunk along its longest axis until the estimated training
      memory (``medseg info``'s estimate) fits ``memory_gb``;
    * batch size: the largest (at least 2) that fits, capped at 5 % of the dataset's
      voxels per step.
    """
    from medseg.models import build_model
    from medseg.models.info import describe_model

    model_cfg = config.model  # num_classes and in_channels already resolved
    if memory_gb is None:
        memory_gb = config.train.memory_gb or default_memory_gb()
    dims = model_cfg.spatial_dims
    scan_dims = len(fingerprint["shape"]["median"])  # 3 for a 2D network on volumes
    spacing = config.data.target_spacing_mm or tuple(
        fingerprint["spacing_mm"]["median"][:scan_dims]
    )
    if len(spacing) != scan_dims:
        raise ValueError(
            f"data.target_spacing_mm {tuple(spacing)} must have {scan_dims} values, "
            f"one per axis of the scans"
        )
    median_spacing = np.array(fingerprint["spacing_mm"]["median"][:scan_dims])
    median_shape = (
        np.array(fingerprint["shape"]["median"][:scan_dims])
        * median_spacing
        / np.array(spacing)
    )
    median_shape = tuple(int(round(n)) for n in median_shape)
    slice_axis = slice_axis_for(spacing) if scan_dims > dims else None
    in_plane = [n for a, n in enumerate(median_shape) if a != slice_axis]
    depth = len(model_cfg.options.get("filters", (32, 64, 128, 256, 320))) - 1
    multiple = 2**depth if model_cfg.name != "classifier" else 1
    patch = list(model_cfg.patch_size or (_round_up(n, multiple) for n in in_plane))
    unpadded = model_cfg.options.get("padding", "same") == "valid"
    if unpadded and model_cfg.patch_size is None:
        patch = _valid_sizes(model_cfg, depth, patch)
    precision_bytes = 2 if config.train.precision.startswith("mixed") else 4

    def estimate(patch_size):
        """(fixed bytes, activation bytes per sample) in GB for a patch size."""
        kwargs = {**model_cfg.builder_kwargs(), "patch_size": tuple(patch_size)}
        model = build_model(model_cfg.name, **kwargs)
        info = describe_model(
            model,
            batch_size=1,
            optimizer=config.train.optimizer,
            activation_bytes=precision_bytes,
        )
        memory = info.memory_bytes
        return (memory["total"] - memory["activations"]) / 1e9, memory[
            "activations"
        ] / 1e9

    batch = config.train.batch_size or MIN_BATCH
    fixed, per_sample = estimate(patch)
    wanted = tuple(patch)
    while (
        model_cfg.patch_size is None
        and not unpadded  # its sizes are not multiples of 2**depth
        and fixed + batch * per_sample > memory_gb
        and max(patch) > multiple
    ):
        patch[int(np.argmax(patch))] -= multiple
        fixed, per_sample = estimate(patch)
    _check_batch_fits(
        config, batch, wanted, patch, fixed + batch * per_sample, memory_gb
    )
    if config.train.batch_size is None:
        dataset_voxels = fingerprint["num_readable_cases"] * math.prod(median_shape)
        cap = max(
            MIN_BATCH, int(MAX_BATCH_FRACTION * dataset_voxels / math.prod(patch))
        )
        fits = int((memory_gb - fixed) // max(per_sample, 1e-12))
        batch = max(MIN_BATCH, min(cap, fits))
    used = fixed + batch * per_sample
    return Plan(
        tuple(float(s) for s in spacing),
        median_shape,
        tuple(patch),
        batch,
        float(memory_gb),
        float(used),
        model_cfg.num_classes,
        model_cfg.in_channels,
        slice_axis,
    )
