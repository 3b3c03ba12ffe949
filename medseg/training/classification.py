"""Classification training data: MedMNIST-style ``.npz`` arrays, normalised per sample,
augmented by the same TensorFlow ops as segmentation patches, and validation numbers
(accuracy, balanced accuracy, AUC) computed in NumPy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medseg.config import Config
from medseg.datasets import load_npz_dataset
from medseg.preprocessing import Preprocessor, ZScoreNormalization, normalize

#: Batch size when the config gives none (the images are small).
DEFAULT_BATCH = 32


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as half.

    NaN when only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (mean recall over classes present) and AUC (class 1's
    for two classes, else the mean one-vs-rest AUC over classes present)."""
    predicted = probabilities.argmax(-1)
    present = np.unique(labels)
    recalls = [float(np.mean(predicted[labels == k] == k)) for k in present]
    if probabilities.shape[-1] == 2:
        auc = binary_auc(probabilities[:, 1], labels == 1)
    else:
        aucs = [binary_auc(probabilities[:, k], labels == k) for k in present]
        aucs = [a for a in aucs if not np.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": float(np.mean(recalls)),
        "auc": auc,
    }


def load_arrays(config: Config):
    """Normalised train and validation arrays, the resolved config and preprocessor."""
    dataset = load_npz_dataset(config.data.dataset)
    train_images, train_labels = dataset.splits["train"]
    channels = train_images.shape[-1]
    schemes = config.data.normalization
    if schemes is None:
        normalizers = (ZScoreNormalization(),) * channels
    else:
        from medseg.preprocessing import normalizer_from_dict

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
