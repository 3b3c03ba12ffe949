"""Validation during training, on whole held-out cases (or the ``val`` split)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import keras
import numpy as np

from medseg.inference.sliding_window import (
    output_window,
    slicewise,
    sliding_window_predict,
    windows_per_pass,
)

if TYPE_CHECKING:
    from medseg.training.trainer import Run

#: Windows per forward pass during validation (inference needs no gradients); more of
#: small windows (:func:`medseg.inference.windows_per_pass`).
VALIDATION_BATCH = 8


def predictor(model, run: Run):
    """A NumPy-in, NumPy-out forward pass, traced once per batch shape and kept on the
    run, so validating every epoch does not trace it again."""
    import tensorflow as tf

    from medseg.models import main_output

    if getattr(run, "_predict", None) is not None:
        return run._predict
    main = main_output(model)  # a deep-supervised U-Net: the full-resolution logits

    @tf.function(reduce_retracing=True)
    def forward(batch):
        return main(batch, training=False)

    def predict(batch):
        return keras.ops.convert_to_numpy(forward(batch)).astype(np.float32)

    run._predict = predict
    return predict


def validate(model, run: Run) -> dict[str, float]:
    """Segmentation: Dice per foreground class over the held-out cases, on whole cases.
    Reconstruction: mean squared error of the whole reconstructed cases."""
    if run.task == "reconstruction":
        return _validate_reconstruction(model, run)
    if run.task == "classification":
        return _validate_classification(model, run)
    num_classes = run.plan.num_classes
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)

    from medseg.models import main_output

    predict = slicewise(predictor(model, run), run.plan.slice_axis)
    output = output_window(main_output(model), run.plan.window, run.plan.slice_axis)
    for case in run.val_cases:
        scores = sliding_window_predict(
            case.image,
            predict,
            patch_size=run.plan.window,
            overlap=run.config.train.val_overlap,
            batch_size=windows_per_pass(run.plan.window, VALIDATION_BATCH),
            output_size=output,
        )
        prediction = scores.argmax(-1)
        truth = case.label[..., 0]
        for k in range(1, num_classes):
            p, t = prediction == k, truth == k
            tp[k] += np.count_nonzero(p & t)
            fp[k] += np.count_nonzero(p & ~t)
            fn[k] += np.count_nonzero(~p & t)
    dice = {}
    for k in range(1, num_classes):
        denominator = 2 * tp[k] + fp[k] + fn[k]
        dice[f"val_dice_{k}"] = (
            float(2 * tp[k] / denominator) if denominator else math.nan
        )
    values = [v for v in dice.values() if not math.isnan(v)]
    dice["val_dice_mean"] = float(np.mean(values)) if values else math.nan
    return dice


def _validate_reconstruction(model, run: Run) -> dict[str, float]:
    predict = slicewise(predictor(model, run), run.plan.slice_axis)
    squared, count = 0.0, 0
    for case in run.val_cases:
        output = sliding_window_predict(
            case.image,
            predict,
            patch_size=run.plan.window,
            overlap=run.config.train.val_overlap,
            batch_size=windows_per_pass(run.plan.window, VALIDATION_BATCH),
        )
        squared += float(np.sum((output - case.image) ** 2))
        count += case.image.size
    return {"val_mse": squared / count}


def _validate_classification(model, run: Run) -> dict[str, float]:
    from medseg.evaluation.classification import classification_scores

    images, labels = run.val_cases
    predict = predictor(model, run)
    logits = np.concatenate(
        [predict(images[i : i + 64]) for i in range(0, len(images), 64)]
    )
    probabilities = np.asarray(keras.ops.softmax(logits, axis=-1))
    return {
        f"val_{k}": v for k, v in classification_scores(probabilities, labels).items()
    }


def calibrate_bundle(folder, run: Run) -> dict:
    """Fits the softmax temperature of the bundle in ``folder`` (the epoch it kept) on
    the validation cases' blended logits, as predict blends them (without mirroring),
    and records it in the bundle with the negative log-likelihood and the expected
    calibration error before and after. Returns that record."""
    import tensorflow as tf

    from medseg import bundle
    from medseg.evaluation.calibration import (
        FIT_VOXELS,
        Reliability,
        fit_temperature,
        negative_log_likelihood,
        sample_voxels,
        softmax,
    )
    from medseg.models import load_model

    metadata = bundle.verify(folder)
    model = load_model(folder)
    forward = tf.function(lambda batch: model(batch, training=False))

    def predict(batch):
        return keras.ops.convert_to_numpy(forward(batch)).astype(np.float32)

    rng = np.random.default_rng(run.config.train.seed)
    per_case = max(10_000, FIT_VOXELS // len(run.val_cases))
    logits, truth = [], []
    for case in run.val_cases:
        blended = sliding_window_predict(
            case.image,
            slicewise(predict, run.plan.slice_axis),
            patch_size=run.plan.window,
            overlap=run.config.train.val_overlap,
            batch_size=windows_per_pass(run.plan.window, VALIDATION_BATCH),
            output_size=output_window(model, run.plan.window, run.plan.slice_axis),
        )
        z, y = sample_voxels(blended, case.label[..., 0], per_case, rng)
        logits.append(z)
        truth.append(y)
    z, y = np.concatenate(logits), np.concatenate(truth)
    temperature = round(fit_temperature(z, y), 4)
    names = list(metadata.label_names)
    before = Reliability.of(softmax(z), y)
    after = Reliability.of(softmax(z, temperature), y)
    record = {
        "temperature": temperature,
        "fitted_on": "validation cases",
        "cases": len(run.val_cases),
        "voxels": int(len(y)),
        "bins": before.bins,
        "nll": {
            "before": round(negative_log_likelihood(z, y), 6),
            "after": round(negative_log_likelihood(z, y, temperature), 6),
        },
    }
    for key, counts in (("before", before), ("after", after)):
        summary = counts.summary(names)
        record.setdefault("ece", {})[key] = summary["ece"]
        record.setdefault("ece_per_label", {})[key] = summary["ece_per_label"]
    bundle.write_metadata(folder, {**metadata.to_dict(), "calibration": record})
    return record


def profile_bundle(folder, cases, seed: int = 0) -> dict:
    """Records in the bundle in ``folder`` what its training scans (``cases``,
    prepared; at most :data:`~medseg.inference.ood.MAX_PROFILE_SCANS` of them, evenly
    spread) look like, for predict's out-of-distribution check: their normalised
    intensity percentiles and their bottleneck features as predict computes them
    (its default overlap; features are of the windows as they are, mirrored or not).
    Returns the record."""
    from medseg import bundle
    from medseg.inference import Segmenter
    from medseg.inference.ood import (
        MAX_PROFILE_SCANS,
        bottleneck_layer,
        intensity_point,
        profile_record,
    )

    segmenter = Segmenter(folder, precision="float32", ood="off")
    segmenter.feature_layer = bottleneck_layer(segmenter.model)
    if len(cases) > MAX_PROFILE_SCANS:
        chosen = np.linspace(0, len(cases) - 1, MAX_PROFILE_SCANS).round()
        cases = [cases[int(i)] for i in chosen]
    intensities, features = [], []
    for case in cases:
        intensities.append(intensity_point(case.image))
        segmenter.probabilities(case.image)
        features.append(segmenter.features)
    layer = segmenter.feature_layer
    record = profile_record(
        intensities, features if layer is not None else None, layer, seed
    )
    # the segmenter verified the bundle as it loaded it: its record, not a second read
    bundle.write_metadata(folder, {**segmenter.metadata.to_dict(), "ood": record})
    return record
