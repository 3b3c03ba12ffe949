"""Segmentation losses (pure functions, then registered Keras classes), a Dice metric.

Shapes: ``labels`` are integer class maps ``(B, *S)`` or ``(B, *S, 1)``; ``logits``
are ``(B, *S, K)``. Losses apply the softmax themselves (``from_logits``) in float32,
also under mixed precision.

Reductions are stated per function. An empty class (absent from truth and prediction)
has Dice 1 thanks to the smoothing term, so it adds no loss; a class absent from the
truth but predicted gets Dice near 0.
"""

from __future__ import annotations

import keras
from keras import ops

#: Smoothing added to numerator and denominator of soft Dice and Tversky.
SMOOTH = 1e-5


def _prepare(labels, logits):
    """float32 softmax probabilities and one-hot labels, both ``(B, *S, K)``."""
    logits = ops.cast(logits, "float32")
    num_classes = logits.shape[-1]
    labels = ops.cast(labels, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    return ops.softmax(logits, axis=-1), ops.one_hot(
        labels, num_classes, dtype="float32"
    )


def _sum_axes(x, batch: bool) -> list[int]:
    """Spatial axes (and the batch axis when ``batch``) of a ``(B, *S, K)`` tensor."""
    spatial = list(range(1, len(x.shape) - 1))
    return [0, *spatial] if batch else spatial


def _foreground(values, include_background: bool):
    return values if include_background else values[..., 1:]


def soft_dice_loss(
    labels,
    logits,
    *,
    include_background: bool = False,
    batch_dice: bool = False,
    smooth: float = SMOOTH,
):
    """``1 - mean soft Dice`` over classes.

    Dice of class k: ``(2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)`` with
    ``p`` the softmax probability and ``g`` the one-hot truth.

    Reduction: sums over voxels of each sample (``batch_dice``: over the whole batch, as
    nnU-Net's batch Dice), mean over classes (background excluded by default).

    Returns:
        ``(B,)`` per-sample losses, or a scalar with ``batch_dice``.
    """
    probs, onehot = _prepare(labels, logits)
    axes = _sum_axes(probs, batch_dice)
    intersection = ops.sum(probs * onehot, axis=axes)
    denominator = ops.sum(probs, axis=axes) + ops.sum(onehot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - ops.mean(_foreground(dice, include_background), axis=-1)


def cross_entropy_loss(labels, logits):
    """Categorical cross-entropy. Reduction: mean over voxels, per sample: ``(B,)``."""
    probs_log = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    _, onehot = _prepare(labels, logits)
    per_voxel = -ops.sum(onehot * probs_log, axis=-1)
    return ops.mean(per_voxel, axis=list(range(1, len(per_voxel.shape))))


def dice_ce_loss(
    labels,
    logits,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    include_background: bool = False,
    batch_dice: bool = False,
):
    """``dice_weight * soft Dice loss + ce_weight * cross-entropy`` (nnU-Net's default).

    Returns:
        ``(B,)`` per-sample losses (with ``batch_dice`` the Dice part is broadcast).
    """
    dice = soft_dice_loss(
        labels, logits, include_background=include_background, batch_dice=batch_dice
    )
    return dice_weight * dice + ce_weight * cross_entropy_loss(labels, logits)


def focal_loss(labels, logits, *, gamma: float = 2.0, alpha=None):
    """Focal loss: ``-alpha_t * (1 - p_t) ** gamma * log(p_t)`` (Lin et al. 2017).

    Args:
        gamma: focusing parameter (0 gives cross-entropy).
        alpha: optional per-class weights (length K).
    Reduction: mean over voxels per sample: ``(B,)``.
    """
    probs, onehot = _prepare(labels, logits)
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    p_t = ops.sum(probs * onehot, axis=-1)
    log_p_t = ops.sum(log_probs * onehot, axis=-1)
    per_voxel = -ops.power(1.0 - p_t, gamma) * log_p_t
    if alpha is not None:
        per_voxel = per_voxel * ops.sum(
            onehot * ops.convert_to_tensor(alpha, "float32"), axis=-1
        )
    return ops.mean(per_voxel, axis=list(range(1, len(per_voxel.shape))))


def tversky_loss(
    labels,
    logits,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    include_background: bool = False,
    smooth: float = SMOOTH,
):
    """``1 - mean Tversky index``: ``TP / (TP + alpha * FP + beta * FN)`` per class
    (Salehi et al. 2017); ``alpha = beta = 0.5`` is soft Dice. Soft counts from the
    softmax. Reduction: per sample over voxels, mean over classes: ``(B,)``."""
    probs, onehot = _prepare(labels, logits)
    axes = _sum_axes(probs, False)
    tp = ops.sum(probs * onehot, axis=axes)
    fp = ops.sum(probs * (1.0 - onehot), axis=axes)
    fn = ops.sum((1.0 - probs) * onehot, axis=axes)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return 1.0 - ops.mean(_foreground(index, include_background), axis=-1)


@keras.saving.register_keras_serializable(package="medseg")
class DiceLoss(keras.losses.Loss):
    """Keras wrapper of :func:`soft_dice_loss` (mean over the batch)."""

    def __init__(
        self, include_background=False, batch_dice=False, name="dice_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.include_background = include_background
        self.batch_dice = batch_dice

    def call(self, y_true, y_pred):
        return soft_dice_loss(
            y_true,
            y_pred,
            include_background=self.include_background,
            batch_dice=self.batch_dice,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "include_background": self.include_background,
            "batch_dice": self.batch_dice,
        }


@keras.saving.register_keras_serializable(package="medseg")
class DiceCELoss(keras.losses.Loss):
    """Keras wrapper of :func:`dice_ce_loss` (mean over the batch)."""

    def __init__(
        self,
        dice_weight=1.0,
        ce_weight=1.0,
        include_background=False,
        batch_dice=False,
        name="dice_ce_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch_dice = batch_dice

    def call(self, y_true, y_pred):
        return dice_ce_loss(
            y_true,
            y_pred,
            dice_weight=self.dice_weight,
            ce_weight=self.ce_weight,
            include_background=self.include_background,
            batch_dice=self.batch_dice,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
            "include_background": self.include_background,
            "batch_dice": self.batch_dice,
        }


@keras.saving.register_keras_serializable(package="medseg")
class FocalLoss(keras.losses.Loss):
    """Keras wrapper of :func:`focal_loss` (mean over the batch)."""

    def __init__(self, gamma=2.0, alpha=None, name="focal_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = gamma
        self.alpha = None if alpha is None else list(alpha)

    def call(self, y_true, y_pred):
        return focal_loss(y_true, y_pred, gamma=self.gamma, alpha=self.alpha)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="medseg")
class DiceFocalLoss(keras.losses.Loss):
    """Soft Dice (background excluded) plus focal loss (``gamma`` 2), per sample:
    Dice + cross-entropy with the cross-entropy of well-classified voxels turned
    down."""

    def __init__(self, gamma=2.0, name="dice_focal_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = gamma

    def call(self, y_true, y_pred):
        return soft_dice_loss(y_true, y_pred) + focal_loss(
            y_true, y_pred, gamma=self.gamma
        )

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="medseg")
class TverskyLoss(keras.losses.Loss):
    """Keras wrapper of :func:`tversky_loss` (mean over the batch)."""

    def __init__(
        self,
        alpha=0.3,
        beta=0.7,
        include_background=False,
        name="tversky_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = alpha
        self.beta = beta
        self.include_background = include_background

    def call(self, y_true, y_pred):
        return tversky_loss(
            y_true,
            y_pred,
            alpha=self.alpha,
            beta=self.beta,
            include_background=self.include_background,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "beta": self.beta,
            "include_background": self.include_background,
        }


def deep_supervision_weights(outputs: int) -> list[float]:
    """Loss weights of a deep-supervised U-Net's outputs, full resolution first: each
    level half the one above (1, 1/2, 1/4, ...), normalised to sum to 1, as nnU-Net
    weighs them."""
    if outputs < 1:
        raise ValueError(f"outputs must be >= 1, got {outputs}")
    raw = [0.5**level for level in range(outputs)]
    return [w / sum(raw) for w in raw]


#: Losses by the name configs use.
LOSSES = {
    "dice": DiceLoss,
    "dice_ce": DiceCELoss,
    "dice_focal": DiceFocalLoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
}


@keras.saving.register_keras_serializable(package="medseg")
class ArgmaxDice(keras.metrics.Metric):
    """Dice of one class on argmax predictions, accumulated over all voxels seen.

    ``2 TP / (2 TP + FP + FN)`` from hard (argmax) predictions, summed over every batch
    since the last reset, so it is the Dice of the class over the epoch's voxels (not a
    soft or per-batch average). With no voxel of the class in truth or prediction the
    result is NaN (undefined), not 1 or 0.
    """

    def __init__(self, class_id: int, name=None, **kwargs):
        super().__init__(name=name or f"dice_{class_id}", **kwargs)
        self.class_id = class_id
        self.tp = self.add_variable((), initializer="zeros", name="tp")
        self.fp = self.add_variable((), initializer="zeros", name="fp")
        self.fn = self.add_variable((), initializer="zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):
            labels = ops.squeeze(labels, axis=-1)
        predicted = ops.argmax(y_pred, axis=-1) == self.class_id
        truth = labels == self.class_id
        self.tp.assign_add(ops.sum(ops.cast(predicted & truth, "float32")))
        self.fp.assign_add(ops.sum(ops.cast(predicted & ~truth, "float32")))
        self.fn.assign_add(ops.sum(ops.cast(~predicted & truth, "float32")))

    def result(self):
        denominator = 2.0 * self.tp + self.fp + self.fn
        return ops.where(
            denominator > 0, 2.0 * self.tp / ops.maximum(denominator, 1.0), float("nan")
        )

    def reset_state(self):
        for variable in (self.tp, self.fp, self.fn):
            variable.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}
