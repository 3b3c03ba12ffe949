"""Classification training data: MedMNIST-style ``.npz`` arrays, normalised per sample,
augmented by the same TensorFlow ops as segmentation patches, and validation numbers
(accuracy, balanced accuracy, AUC) computed in NumPy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medseg.config import Config
from medseg.datasets.layouts import load_npz_dataset
from medseg.preprocessing.intensity import ZScoreNormalization, normalize
from medseg.preprocessing.preprocessor import Preprocessor

#: Batch size when the config gives none (the images are small).
DEFAULT_BATCH = 32


def load_arrays(config: Config):
    """Normalised train and validation arrays, the resolved config and preprocessor."""
    dataset = load_npz_dataset(config.data.dataset)
    train_images, train_labels = dataset.splits["train"]
    channels = train_images.shape[-1]
    schemes = config.data.normalization
    if schemes is None:
        normalizers = (ZScoreNormalization(),) * channels
    else:
        from medseg.preprocessing.intensity import normalizer_from_dict

        normalizers = tuple(normalizer_from_dict(s) for s in schemes)
    preprocessor = Preprocessor(
        normalizers, None, crop_nonzero=False, nonfinite=config.data.nonfinite
    )

    def prepare(images):
        return np.stack(
            [normalize(np.asarray(x, np.float32), normalizers) for x in images]
        ).astype(np.float32)

    spatial = tuple(int(n) for n in train_images.shape[1:-1])
    config = config.replace(
        model=replace(
            config.model,
            spatial_dims=dataset.spatial_dims,
            in_channels=channels,
            num_classes=dataset.num_classes,
            patch_size=config.model.patch_size or spatial,
        )
    )
    val = dataset.splits.get("val")
    arrays = {
        "train": (prepare(train_images), train_labels),
        "val": None if val is None else (prepare(val[0]), val[1]),
    }
    return config, preprocessor, arrays, dataset


def make_stream(
    images: np.ndarray,
    labels: np.ndarray,
    augmenter,
    batch_size: int,
    seed: int,
    first_epoch: int,
    steps_per_epoch: int,
):
    """Infinite shuffled, augmented batches; epoch ``e`` is shuffled with
    ``[seed, e]`` so a resumed run sees the same order."""
    import tensorflow as tf

    per_epoch = steps_per_epoch * batch_size

    def epoch_indices(epoch):
        rng = np.random.default_rng([seed, int(epoch)])
        return rng.integers(0, len(images), per_epoch).astype(np.int64)

    def one_epoch(epoch):
        picks = tf.numpy_function(epoch_indices, [epoch], tf.int64)
        picks = tf.ensure_shape(picks, [per_epoch])
        epoch = tf.cast(epoch, tf.int32)
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill([per_epoch], epoch), tf.range(per_epoch, dtype=tf.int32), picks)
        )

    image_table = tf.constant(images)
    label_table = tf.constant(labels.astype(np.int32))

    def load(epoch, position, index):
        image = tf.gather(image_table, index)
        label = tf.gather(label_table, index)
        if augmenter is not None:
            seed_pair = tf.stack([epoch, position + seed])
            dummy = tf.zeros(tf.concat([tf.shape(image)[:-1], [1]], 0), tf.int32)
            image, _ = augmenter(image, dummy, seed_pair)
        return image, label

    stream = (
        tf.data.Dataset.counter(first_epoch)
        .flat_map(one_epoch)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    )
    return stream.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
