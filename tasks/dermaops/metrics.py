"""Classification metrics shared by train (validation), train_baseline and evaluate (test).

Labels are integer indices into `classes` (dermaops.dataset.CLASSES order). Every per-class figure is
reported for every class, present or not, so tables from different splits line up row by row.
"""

from __future__ import annotations

import numpy as np

from dermaops.dataset import CLASSES


def classification_metrics(y_true, y_pred, y_proba=None, classes=CLASSES) -> dict:
    """accuracy, balanced_accuracy, macro_f1, weighted_f1, macro_auc and per_class
    {cls: precision, recall, f1, support}.

    balanced_accuracy is the mean recall over the classes present in y_true (sklearn's definition).
    macro_auc is the mean one-vs-rest ROC AUC over the classes that have both positives and negatives in
    y_true (a class absent from a small split has no AUC); None without probabilities or such a class.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal-length, non-empty 1-d")
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        cls: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, cls in enumerate(classes)
    }
    auc_per_class = {}
    if y_proba is not None:
        y_proba = np.asarray(y_proba, dtype=float)
        if y_proba.shape != (len(y_true), len(classes)):
            raise ValueError(f"y_proba has shape {y_proba.shape}, expected {(len(y_true), len(classes))}")
        for i, cls in enumerate(classes):
            positives = y_true == i
            if positives.any() and not positives.all():
                auc_per_class[cls] = float(roc_auc_score(positives, y_proba[:, i]))
    for cls in classes:
        per_class[cls]["auc"] = auc_per_class.get(cls)
    present = [i for i in labels if support[i] > 0]
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if present else 0.0,
        # Macro F1 averages over all classes, present or not, like the seed report: a class the model
        # never predicts and never sees counts as 0, so a tiny split cannot flatter the score.
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_auc": float(np.mean(list(auc_per_class.values()))) if auc_per_class else None,
        "per_class": per_class,
    }


def confusion_counts(y_true, y_pred, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class, every class included."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the per-class recall on the diagonal); empty rows stay 0."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)


# The headline figures, in the order reports list them: what summaries, the run report, Slack, the
# model comparison and the promotion record show of a classification_metrics dict.
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "mel_recall")
DIGITS = 4


def mel_recall(metrics: dict) -> float:
    """Melanoma recall: the figure the promotion floor and every report single out."""
    return metrics["per_class"]["mel"]["recall"]


def headline(metrics: dict, keys: tuple[str, ...] = HEADLINE, digits: int | None = DIGITS) -> dict:
    """The headline figures of a classification_metrics dict, rounded to `digits` (None: as computed);
    macro AUC stays None where it is undefined."""
    out = {}
    for key in keys:
        value = mel_recall(metrics) if key == "mel_recall" else metrics.get(key)
        out[key] = round(value, digits) if digits is not None and value is not None else value
    return out


def format_number(value) -> str:
    """A figure as reports print it: floats to 4 decimals, None as n/a."""
    if value is None:
        return "n/a"
    return f"{value:.{DIGITS}f}" if isinstance(value, float) else str(value)


def operating_point_line(point: dict) -> str:
    """One line: the melanoma threshold and its test sensitivity / specificity with their intervals."""

    def figure(name: str) -> str:
        value, pair = point.get(name), point.get(f"{name}_ci") or [None, None]
        if value is None:
            return f"{name} n/a"
        text = f"{name} {value:.2f}"
        return text + (f" [{pair[0]:.2f}, {pair[1]:.2f}]" if pair[0] is not None else "")

    target = point.get("target_sensitivity")
    chosen = f" (chosen on validation for sensitivity {target})" if target is not None else ""
    return (
        f"Melanoma operating point p(mel) >= {point.get('threshold', float('nan')):.3f}{chosen}: test "
        f"{figure('sensitivity')}, {figure('specificity')} (95 % intervals)"
    )


def champion_operating_point_line(record: dict) -> str:
    """A champion record's operating point (dermaops.promotion.operating_point_record, or a record that has
    only mel_threshold) in one line: the rule, its test figures, and its validation figures."""
    point = record.get("operating_point")
    if point is None:
        threshold = record.get("mel_threshold")
        return "argmax (no stored threshold)" if threshold is None else f"p(mel) >= {threshold:.3f}"
    line = operating_point_line(
        {
            "threshold": point["threshold"],
            "target_sensitivity": point.get("target_sensitivity"),
            **(point.get("test") or {}),
        }
    )
    val = point.get("validation") or {}
    if val.get("sensitivity") is not None:
        line += f"; validation sensitivity {val['sensitivity']:.2f}"
        line += f", specificity {val['specificity']:.2f}" if val.get("specificity") is not None else ""
    return line
