"""Classifier scores -> the numbers the model card and `evaluate.py` report. Pure numpy."""
from __future__ import annotations

import numpy as np


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[y_true], scores[~y_true]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Mann-Whitney U via average ranks handles ties exactly.
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y_true].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def reliability(confidence: np.ndarray, correct: np.ndarray, low: float, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error and the per-bin table, bins evenly over [low, 1]."""
    edges = np.linspace(low, 1.0, bins + 1)
    table, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        if not inside.any():
            continue
        conf, acc = confidence[inside].mean(), correct[inside].mean()
        ece += inside.mean() * abs(conf - acc)
        table.append({"bin": [round(lo, 3), round(hi, 3)], "count": int(inside.sum()),
                      "mean_confidence": round(float(conf), 4), "accuracy": round(float(acc), 4)})
    return float(ece), table


def calibration(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error of the predicted class's confidence, plus the Brier score."""
    y_true = np.asarray(y_true).astype(np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = scores >= 0.5
    confidence = np.where(predicted, scores, 1.0 - scores)
    correct = (predicted == y_true.astype(bool)).astype(np.float64)
    ece, table = reliability(confidence, correct, 0.5, bins)
    return {"ece": ece, "brier": float(np.mean((scores - y_true) ** 2)), "bins": table}


def per_class(matrix: np.ndarray, labels: list[str]) -> dict[str, dict]:
    """Per true class: its images, recall (the share of them answered right: the class's own
    accuracy) and precision (the share of answers naming it that were right); None for 0/0."""
    matrix = np.asarray(matrix)
    table = {}
    for i, label in enumerate(labels):
        images, answered = int(matrix[i].sum()), int(matrix[:, i].sum())
        table[label] = {"images": images,
                        "recall": float(matrix[i, i] / images) if images else None,
                        "precision": float(matrix[i, i] / answered) if answered else None}
    return table


def binary_report(y_true: np.ndarray, scores: np.ndarray, labels: list[str], threshold: float = 0.5) -> dict:
    """Accuracy, confusion matrix (rows = truth, columns = prediction), ROC AUC, calibration."""
    y_true = np.asarray(y_true).astype(int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    matrix = np.zeros((2, 2), dtype=int)
    for t, p in zip(y_true, predicted):
        matrix[t, p] += 1
    cal = calibration(y_true, scores)
    return {
        "images": int(len(y_true)),
        "accuracy": float((predicted == y_true).mean()) if len(y_true) else float("nan"),
        "confusion_matrix": {"labels": labels, "rows_true_columns_predicted": matrix.tolist()},
        "per_class": per_class(matrix, labels),
        "roc_auc": roc_auc(y_true, scores),
        "ece": cal["ece"],
        "brier": cal["brier"],
        "calibration_bins": cal["bins"],
    }


def multiclass_report(y_true: np.ndarray, probabilities: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, confusion matrix and top-1 calibration for a softmax model."""
    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (y_true, predicted), 1)
    correct = predicted == y_true
    ece, bins = reliability(probabilities.max(axis=1), correct.astype(np.float64), 0.0)
    onehot = np.eye(len(labels))[y_true]
    return {
        "images": int(len(y_true)),
        "accuracy": float(correct.mean()) if len(y_true) else float("nan"),
        "confusion_matrix": {"labels": labels, "rows_true_columns_predicted": matrix.tolist()},
        "per_class": per_class(matrix, labels),
        "ece": float(ece),
        "brier": float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1))),
        "calibration_bins": bins,
    }
