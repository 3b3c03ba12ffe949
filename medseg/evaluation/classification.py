"""Scores of a classifier's predictions against the true classes."""

from __future__ import annotations

import numpy as np


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
