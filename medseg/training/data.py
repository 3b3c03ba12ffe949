"""Training data: preprocessed cases, the k-fold split, patch sampling and tf.data.

Each case is preprocessed once (:class:`medseg.preprocessing.Preprocessor`) and kept in
memory or in an on-disk cache keyed by the preprocessing and the source files. Patches
are drawn by a seeded NumPy sampler (a third of them centred on a random foreground
voxel of a random class, by default) and augmented by TensorFlow ops in parallel
threads. The stream is infinite: ``fit`` takes it once with ``steps_per_epoch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.datasets.layouts import Case, Dataset
from medseg.errors import ConfigError
from medseg.io.formats import read_volume, stack_channels
from medseg.io.grid import label_on_grid_of
from medseg.preprocessing.preprocessor import Preprocessor

logger = logging.getLogger(__name__)

#: Fixed seed of the k-fold shuffle, so folds do not change with the training seed.
SPLIT_SEED = 12345


@dataclass
class PreparedCase:
    """A preprocessed case: ``image (*S, C)`` float32, ``label (*S, 1)`` class indices
    (uint8), and for each foreground class the flat indices of its voxels."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: dict[int, np.ndarray]


def kfold_split(case_ids: Sequence[str], folds: int, fold: int | str):
    """Deterministic k-fold split by case: ``(train_ids, val_ids)``.

    Case ids are sorted, shuffled with a fixed seed and dealt into ``folds`` nearly
    equal parts; ``fold="all"`` trains on every case and validates on none.
    """
    ids = sorted(case_ids)
    if fold == "all":
        return ids, []
    if len(ids) < folds:
        raise ConfigError(f"{len(ids)} cases cannot be split into {folds} folds")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
    parts = np.array_split(order, folds)
    val = sorted(ids[i] for i in parts[fold])
    return [i for i in ids if i not in set(val)], val


def class_values(dataset: Dataset) -> list[int]:
    """The declared label values, sorted; class index ``k`` is the ``k``-th value
    (so labels 0/255 train as classes 0/1)."""
    if not dataset.labels:
        raise ConfigError(
            f"{dataset.root}: the dataset declares no labels (give data.labels)"
        )
    return sorted(dataset.labels)


def _to_classes(label: np.ndarray, values: list[int], path) -> np.ndarray:
    from medseg.errors import InputFileError

    flat = np.asarray(label).astype(np.int64)
    index = np.searchsorted(values, flat)
    index = np.clip(index, 0, len(values) - 1)
    if not np.array_equal(np.asarray(values)[index], flat):
        bad = sorted(set(np.unique(flat).tolist()) - set(values))
        raise InputFileError(path, f"label values {bad} not among declared {values}")
    return index.astype(np.uint8 if len(values) <= 256 else np.uint16)


def _cache_key(preprocessor: Preprocessor, case: Case, values: list[int]) -> str:
    from medseg.io.dicom import dicom_files

    parts = {"pre": preprocessor.to_dict(), "values": values, "files": []}
    for path in (*case.images, *([case.label] if case.label and values else [])):
        for file in dicom_files(Path(path)) or [Path(path)]:  # a series: its files
            stat = file.stat()
            parts["files"].append([str(file), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def prepare_case(
    case: Case,
    preprocessor: Preprocessor,
    values: list[int] | None,
    cache_dir: Path | None,
) -> PreparedCase:
    """Reads, preprocesses and indexes one case (from the cache when it is there).
    With ``values=None`` (reconstruction) the label is not read and is all zeros."""
    cached = None
    if cache_dir is not None:
        cached = (
            Path(cache_dir)
            / f"{case.case_id}-{_cache_key(preprocessor, case, values)}.npz"
        )
        if cached.is_file():
            with np.load(cached, allow_pickle=False) as stored:
                return _indexed(case.case_id, stored["image"], stored["label"])
    volumes = [read_volume(path) for path in case.images]
    image_volume = stack_channels(volumes, case.images)
    image, records = preprocessor.image(image_volume)
    if values is None or case.label is None:  # reconstruction: images only
        label = np.zeros((*image.shape[:-1], 1), np.uint8)
    else:
        label = read_volume(case.label)
        # in another voxel order, or on a box of the image's grid: placed on it
        placed = label_on_grid_of(label, image_volume)
        label = preprocessor.label(label if placed is None else placed, records)
        label = _to_classes(label, values, case.label)
    if cached is not None:
        from medseg.io.files import atomic_output

        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cached) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, image=image, label=label)
    return _indexed(case.case_id, image, label)


def _indexed(case_id: str, image: np.ndarray, label: np.ndarray) -> PreparedCase:
    flat = label.reshape(-1)
    foreground = {int(k): np.flatnonzero(flat == k) for k in np.unique(flat) if k != 0}
    return PreparedCase(
        case_id, image.astype(np.float32, copy=False), label, foreground
    )


class PatchSampler:
    """Draws ``(image, label)`` patches from prepared cases, repeatably.

    Samples of epoch ``e`` come from ``default_rng([seed, e])``, so a run resumed at
    epoch ``e`` draws the same patches as an uninterrupted one. With ``slice_axis``
    (a 2D network on 3D cases) ``patch_size`` is the 2D patch: each sample is a patch
    of one slice across that axis, the 3D case's axis removed.
    """

    def __init__(
        self,
        cases: list[PreparedCase],
        patch_size: Sequence[int],
        *,
        foreground_oversample: float,
        seed: int,
        samples_per_epoch: int,
        slice_axis: int | None = None,
    ):
        from medseg.bundle import window_of

        if not cases:
            raise ConfigError("no training cases")
        self.cases = cases
        self.sample_size = tuple(int(p) for p in patch_size)  # what the network takes
        self.patch_size = window_of(patch_size, slice_axis)  # what is cut from a case
        self.slice_axis = slice_axis
        self.foreground_oversample = foreground_oversample
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch

    def patch(self, case: PreparedCase, centre: Sequence[int]):
        """The patch of ``case`` centred (as nearly as possible) on ``centre``, zero
        padded where it leaves the case."""
        spatial = case.image.shape[:-1]
        starts = [int(c) - p // 2 for c, p in zip(centre, self.patch_size, strict=True)]
        src, dst = [], []
        for start, p, n in zip(starts, self.patch_size, spatial, strict=True):
            lo, hi = max(start, 0), min(start + p, n)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        image = np.zeros((*self.patch_size, case.image.shape[-1]), np.float32)
        label = np.zeros((*self.patch_size, 1), np.int32)
        image[tuple(dst)] = case.image[tuple(src)]
        label[tuple(dst)] = case.label[tuple(src)]
        return image, label

    def _centre(self, case: PreparedCase, rng: np.random.Generator):
        spatial = case.image.shape[:-1]
        if case.foreground and rng.random() < self.foreground_oversample:
            k = rng.choice(sorted(case.foreground))
            voxel = case.foreground[k][rng.integers(len(case.foreground[k]))]
            return np.unravel_index(voxel, spatial)
        # uniform over positions keeping the patch inside where the case allows
        return [
            rng.integers(p // 2, max(n - (p - p // 2), p // 2) + 1)
            for n, p in zip(spatial, self.patch_size, strict=True)
        ]

    def samples(self, first_epoch: int = 0):
        """Infinite generator of ``(image, label, seed)`` from ``first_epoch`` on."""
        epoch = first_epoch
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            for index in range(self.samples_per_epoch):
                case = self.cases[rng.integers(len(self.cases))]
                image, label = self.patch(case, self._centre(case, rng))
                if self.slice_axis is not None:
                    image = image.squeeze(self.slice_axis)
                    label = label.squeeze(self.slice_axis)
                seed = np.array([epoch, index], np.int32) + np.array(
                    [0, self.seed], np.int32
                )
                yield image, label, seed
            epoch += 1


def deep_supervision_targets(label, levels: int) -> tuple:
    """``(label, label at 1/2, ..., label at 1/2**levels)`` of a ``(*S, 1)`` label
    patch: the targets of a deep-supervised U-Net's outputs ``logits``,
    ``logits_ds1``, ... At 1/s, output voxel ``i`` covers voxels ``s*i .. s*i+s-1``
    along each axis and takes the label of the one at ``s*i + s//2`` (nearest
    neighbour to the block's centre)."""
    dims = len(label.shape) - 1
    targets = [label]
    for level in range(1, levels + 1):
        s = 2**level
        targets.append(label[(*[slice(s // 2, None, s)] * dims, slice(None))])
    return tuple(targets)


def make_dataset(
    sampler: PatchSampler,
    augmenter,
    batch_size: int,
    first_epoch: int,
    shard: bool = True,
    target: str = "label",
    deep_supervision: int = 0,
    label_margins: tuple[int, ...] = (),
):
    """The infinite ``tf.data`` stream of augmented batches ``(images, labels)``.

    ``batch_size`` is the global batch. With ``shard=False`` (multi-worker training,
    where each worker samples its own patches) tf.distribute does not split the stream
    by worker. ``target="image"`` pairs each augmented image with itself
    (reconstruction) instead of with its label. ``deep_supervision`` levels make the
    labels a tuple (:func:`deep_supervision_targets`). ``label_margins``: voxels cut
    from each side of the labels, per spatial axis, after augmentation: an unpadded
    (``"valid"``) U-Net labels the centre of its input only.
    """
    import tensorflow as tf

    channels = sampler.cases[0].image.shape[-1]
    spec = (
        tf.TensorSpec((*sampler.sample_size, channels), tf.float32),
        tf.TensorSpec((*sampler.sample_size, 1), tf.int32),
        tf.TensorSpec((2,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(
        lambda: sampler.samples(first_epoch), output_signature=spec
    )
    if augmenter is not None:
        dataset = dataset.map(
            augmenter, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    else:
        dataset = dataset.map(lambda image, label, seed: (image, label))
    if any(label_margins):
        centre = tuple(
            slice(m, n - m)
            for m, n in zip(label_margins, sampler.sample_size, strict=True)
        )
        dataset = dataset.map(lambda image, label: (image, label[centre]))
    if target == "image":
        dataset = dataset.map(lambda image, label: (image, image))
    elif deep_supervision:
        dataset = dataset.map(
            lambda image, label: (
                image,
                deep_supervision_targets(label, deep_supervision),
            )
        )
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    if not shard:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        dataset = dataset.with_options(options)
    return dataset
