"""Inference: sliding-window prediction, bundles ready to segment or classify scans,
ensembles, post-processing, and :mod:`medseg.inference.jobs` for many scans at once."""

from medseg.bundle import window_of
from medseg.inference.classifier import Classifier, ClassifierEnsemble
from medseg.inference.ensemble import Ensemble, ensemble_problem
from medseg.inference.precision import (
    AUTO_PRECISION_VARIABLE,
    PRECISIONS,
    cpu_has_amx_bf16,
    cpu_info,
    cpu_lacks_onednn_bfloat16,
    inference_precision,
)
from medseg.inference.scan_plan import (
    bundle_mirror_axes,
    check_scan,
    field_of_view_note,
    scan_plan,
)
from medseg.inference.segmenter import Prediction, Segmenter, write_probabilities
from medseg.inference.sliding_window import (
    BLENDS,
    gaussian_importance,
    slicewise,
    sliding_window_predict,
    window_starts,
    windows_per_pass,
)

__all__ = [
    "AUTO_PRECISION_VARIABLE",
    "BLENDS",
    "PRECISIONS",
    "Classifier",
    "ClassifierEnsemble",
    "Ensemble",
    "Prediction",
    "Segmenter",
    "bundle_mirror_axes",
    "check_scan",
    "cpu_has_amx_bf16",
    "cpu_info",
    "cpu_lacks_onednn_bfloat16",
    "ensemble_problem",
    "field_of_view_note",
    "gaussian_importance",
    "inference_precision",
    "scan_plan",
    "slicewise",
    "sliding_window_predict",
    "window_of",
    "window_starts",
    "windows_per_pass",
    "write_probabilities",
]
