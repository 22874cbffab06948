"""The Random Forest baseline: features in, fitted forest and its validation metrics out, and scoring a
saved forest on new images (train_baseline fits it, evaluate scores it on the test split).

The saved bundle is {"model": RandomForestClassifier, "meta": {classes, image_size, feature_version, ...}};
a bundle fitted on other features or classes than this code computes is refused, not mis-scored.
"""

from __future__ import annotations

import logging
import time

from dermaops.errors import StageError

log = logging.getLogger(__name__)


def fit_and_score(cache, train, val, params: dict, n_jobs: int):
    """(fitted forest, its meta, validation metrics, fit seconds)."""
    from sklearn.ensemble import RandomForestClassifier

    from dermaops.dataset import CLASSES
    from dermaops.features import FEATURE_VERSION, feature_names, image_features
    from dermaops.metrics import classification_metrics, mel_recall

    x_train = image_features(cache.rows(train["image_id"].tolist()))
    x_val = image_features(cache.rows(val["image_id"].tolist()))
    log.info("features: %d train x %d, %d val", len(x_train), x_train.shape[1], len(x_val))
    model = RandomForestClassifier(
        n_estimators=params["n_estimators"],
        max_depth=params["max_depth"],
        min_samples_leaf=params["min_samples_leaf"],
        class_weight="balanced" if params["class_weight"] == "balanced" else None,
        random_state=params["seed"],
        n_jobs=n_jobs,
    )
    started = time.monotonic()
    model.fit(x_train, train["label"].to_numpy())
    seconds = round(time.monotonic() - started, 2)
    proba = predict_proba(model, x_val, len(CLASSES))
    metrics = classification_metrics(val["label"].to_numpy(), proba.argmax(axis=1), proba)
    log.info(
        "baseline fitted in %.1f s: val macro F1 %.3f, accuracy %.3f, mel recall %.3f",
        seconds,
        metrics["macro_f1"],
        metrics["accuracy"],
        mel_recall(metrics),
    )
    meta = {
        "classes": list(CLASSES),
        "image_size": params["image_size"],
        "geometry": params.get("geometry", "squash"),
        "feature_version": FEATURE_VERSION,
        "feature_dim": int(x_train.shape[1]),
        "feature_names": feature_names(),
        "params": params,
    }
    return model, meta, metrics, seconds


def predict_proba(model, features, n_classes: int):
    """(N, n_classes) probabilities: a forest only has columns for the classes it saw while fitting,
    so they are placed in their label positions and the unseen classes get 0."""
    import numpy as np

    proba = np.zeros((len(features), n_classes), dtype=np.float64)
    proba[:, model.classes_.astype(int)] = model.predict_proba(features)
    return proba


def score_bundle(bundle: dict, images, classes) -> object:
    """(N, len(classes)) probabilities of a saved baseline bundle on uint8 images at its image size."""
    from dermaops.features import FEATURE_VERSION, image_features

    meta = bundle["meta"]
    if meta.get("feature_version") != FEATURE_VERSION or list(meta.get("classes", [])) != list(classes):
        raise StageError(
            f"the baseline was fitted on feature version {meta.get('feature_version')} / classes "
            f"{meta.get('classes')}; this code computes version {FEATURE_VERSION} / {list(classes)}: retrain it"
        )
    return predict_proba(bundle["model"], image_features(images), len(classes))
