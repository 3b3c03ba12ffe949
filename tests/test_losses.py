from __future__ import annotations

import keras
import numpy as np
import pytest

from medseg import losses
from tests import reference


@pytest.fixture
def batch(rng):
    labels = rng.integers(0, 3, size=(2, 5, 6, 4))
    logits = rng.normal(0, 2, size=(2, 5, 6, 4, 3)).astype(np.float32)
    return labels, logits


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_soft_dice_matches_reference(batch, include_background, batch_dice):
    labels, logits = batch
    out = losses.soft_dice_loss(
        labels, logits, include_background=include_background, batch_dice=batch_dice
    )
    expected = reference.soft_dice_loss(labels, logits, include_background, batch_dice)
    np.testing.assert_allclose(np.atleast_1d(np.asarray(out)), expected, rtol=1e-5)


def test_cross_entropy_focal_tversky_match_reference(batch):
    labels, logits = batch
    np.testing.assert_allclose(
        losses.cross_entropy_loss(labels, logits),
        reference.cross_entropy(labels, logits),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.focal_loss(labels, logits, gamma=2.0),
        reference.focal(labels, logits, 2.0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.focal_loss(labels, logits, gamma=0.0, alpha=[0.2, 0.3, 0.5]),
        reference.focal(labels, logits, 0.0, [0.2, 0.3, 0.5]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.tversky_loss(labels, logits, alpha=0.3, beta=0.7),
        reference.tversky_loss(labels, logits, 0.3, 0.7),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.DiceFocalLoss().call(labels, logits),
        reference.soft_dice_loss(labels, logits) + reference.focal(labels, logits, 2.0),
        rtol=1e-5,
    )
    # Tversky with alpha = beta = 0.5 is soft Dice
    np.testing.assert_allclose(
        losses.tversky_loss(labels, logits, alpha=0.5, beta=0.5),
        losses.soft_dice_loss(labels, logits),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.dice_ce_loss(labels, logits, dice_weight=2.0),
        2 * reference.soft_dice_loss(labels, logits)
        + reference.cross_entropy(labels, logits),
        rtol=1e-5,
    )


def test_dice_of_perfect_wrong_and_empty_predictions():
    labels = np.zeros((1, 4, 4), np.int64)
    labels[0, :2] = 1
    perfect = np.where(np.eye(2)[labels] > 0, 30.0, -30.0).astype(np.float32)
    assert float(losses.soft_dice_loss(labels, perfect)[0]) == pytest.approx(
        0, abs=1e-6
    )
    wrong = perfect[..., ::-1]
    assert float(losses.soft_dice_loss(labels, wrong)[0]) == pytest.approx(1, abs=1e-6)
    # class 1 absent from truth and prediction: Dice 1 by smoothing, no loss
    empty = np.zeros((1, 4, 4), np.int64)
    background = np.stack([np.full((1, 4, 4), 30.0), np.full((1, 4, 4), -30.0)], -1)
    assert float(losses.soft_dice_loss(empty, background)[0]) == pytest.approx(
        0, abs=1e-5
    )


def test_labels_with_a_channel_axis_and_mixed_precision_logits(batch):
    labels, logits = batch
    a = losses.dice_ce_loss(labels[..., None], logits.astype(np.float16))
    b = losses.dice_ce_loss(labels, logits.astype(np.float16).astype(np.float32))
    assert a.dtype == "float32"
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_loss_classes_reduce_to_the_batch_mean_and_round_trip(name, batch):
    labels, logits = batch
    loss = losses.LOSSES[name]()
    functions = {
        "dice": losses.soft_dice_loss,
        "dice_ce": losses.dice_ce_loss,
        "dice_focal": lambda y, p: (
            np.asarray(losses.soft_dice_loss(y, p))
            + np.asarray(losses.focal_loss(y, p))
        ),
        "focal": losses.focal_loss,
        "tversky": losses.tversky_loss,
    }
    expected = float(np.mean(functions[name](labels, logits)))
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-6)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert clone.get_config() == loss.get_config()
    assert float(clone(labels, logits)) == pytest.approx(expected, rel=1e-6)


def test_argmax_dice_accumulates_hard_dice_over_batches(rng):
    metric = losses.ArgmaxDice(class_id=2)
    truths, predictions = [], []
    for _ in range(3):
        labels = rng.integers(0, 3, size=(2, 4, 5))
        logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
        metric.update_state(labels, logits)
        truths.append(labels)
        predictions.append(logits.argmax(-1))
    expected = reference.hard_dice(
        np.concatenate(truths), np.concatenate(predictions), 2
    )
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    metric.reset_state()
    metric.update_state(np.zeros((1, 3, 3)), np.zeros((1, 3, 3, 3), np.float32))
    assert np.isnan(float(metric.result()))  # class 2 nowhere: undefined, not 0 or 1
    assert losses.ArgmaxDice.from_config(metric.get_config()).class_id == 2


def test_deep_supervision_weights_halve_per_level_and_sum_to_one():
    assert losses.deep_supervision_weights(1) == [1.0]
    np.testing.assert_allclose(
        losses.deep_supervision_weights(4), [8 / 15, 4 / 15, 2 / 15, 1 / 15]
    )
    with pytest.raises(ValueError, match=">= 1"):
        losses.deep_supervision_weights(0)
