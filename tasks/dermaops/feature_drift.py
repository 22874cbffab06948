"""Drift in the champion's own feature space: can its penultimate-layer embeddings tell the reference
dataset (the champion's training data) from the new one?

Two measures on a seeded, equal-sized sample of each dataset:
- domain-classifier AUC: a logistic regression (standardised features) trained to say "new" vs
  "reference", scored by 5-fold cross-validated ROC AUC. 0.5 = the model sees the two the same way;
  drift at >= 0.7 (the classifier separates them clearly, whatever the label distribution says);
- MMD^2 with an RBF kernel (bandwidth = median pairwise distance), the unbiased estimate, for context.

Needs torch (the evaluate stage runs it). The embeddings are the input of the ResNet's `fc` layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dermaops.checkpoint import CheckpointMeta

DEFAULT_AUC = 0.7
DEFAULT_SAMPLE = 500


@dataclass(frozen=True)
class FeatureDrift:
    auc: float
    mmd2: float
    n_per_dataset: int
    threshold: float

    @property
    def drifted(self) -> bool:
        return self.auc >= self.threshold

    def summary(self) -> dict:
        return {
            "domain_auc": round(self.auc, 4),
            "mmd2": round(self.mmd2, 6),
            "n_per_dataset": self.n_per_dataset,
            "threshold": self.threshold,
            "detected": self.drifted,
        }


def sample_ids(image_ids, n: int) -> list[str]:
    """Up to n ids, chosen by a hash of the id: the same data gives the same sample."""
    ranked = sorted(image_ids, key=lambda i: hashlib.sha256(str(i).encode()).digest())
    return sorted(ranked[:n])


def embeddings(model, images, meta: CheckpointMeta, batch_size: int, device: str):
    """Penultimate-layer features (the input of the classifier's final Linear) of uint8 NHWC images, as a
    float32 array."""
    import numpy as np
    import torch

    from dermaops.models import head_name, to_input

    captured: list = []
    hook = model.get_submodule(head_name(model)).register_forward_hook(
        lambda _m, inputs, _out: captured.append(inputs[0].detach().cpu())
    )
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
                model(to_input(batch, meta))
    finally:
        hook.remove()
    return torch.cat(captured).numpy().astype(np.float32)


def domain_auc(reference, current, seed: int = 0) -> float:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([reference, current])
    y = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    proba = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def mmd2(reference, current) -> float:
    """Unbiased MMD^2 with an RBF kernel whose bandwidth is the median pairwise distance."""
    import numpy as np

    x, y = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    z = np.vstack([x, y])
    sq = np.sum(z**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    bandwidth = np.median(d2[np.triu_indices(len(z), 1)]) or 1.0
    k = np.exp(-d2 / bandwidth)
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def compare(model, meta: CheckpointMeta, reference_images, current_images, batch_size: int, device: str,
            threshold: float = DEFAULT_AUC) -> FeatureDrift:  # fmt: skip
    """The champion's view of the two image samples (uint8 NHWC at its image size), equal sizes."""
    n = min(len(reference_images), len(current_images))
    ref = embeddings(model, reference_images[:n], meta, batch_size, device)
    cur = embeddings(model, current_images[:n], meta, batch_size, device)
    return FeatureDrift(domain_auc(ref, cur), mmd2(ref, cur), n, threshold)


def against_champion(ctx, registry_uri, dataset, batch_size: int, device: str, n: int = DEFAULT_SAMPLE) -> dict:
    """The champion's feature-space drift of `dataset` against its own training data: a summary dict, or
    {"skipped": why} when there is nothing to compare (no champion, same data, data or model unreadable).
    Never fails the stage: the gate, not this report, decides about a broken champion."""
    from dermaops.checkpoint import load_checkpoint
    from dermaops.dataset import Dataset
    from dermaops.errors import StageError, TransientError
    from dermaops.imagecache import load_images
    from dermaops.promotion import Registry
    from dermaops.store import S3Uri

    registry = Registry(ctx.store, registry_uri)
    record, problem = registry.champion_record()
    if record is None:
        return {"skipped": problem or "no champion yet"}
    version = record.get("dataset_version")
    if not version or version == dataset.version:
        return {"skipped": f"the champion (run {record.get('run_id')}) was trained on this dataset version"}
    scratch = ctx.scratch / "feature-drift"
    try:
        path, problem = registry.fetch_champion_model(record, scratch / "champion.pt")
        if path is None:
            return {"skipped": problem}
        model, meta = load_checkpoint(path, device=device)
        parent = S3Uri(dataset.uri.bucket, dataset.uri.key.rstrip("/").rsplit("/", 1)[0])
        reference = Dataset.open(ctx.store, parent.join(version), scratch)
        frame = meta.frame
        images = []
        for ds in (reference, dataset):
            ids = sample_ids(ds.metadata["image_id"].astype(str), n)
            images.append(load_images(ctx, ds, frame).rows(ids))
    except TransientError:
        raise
    except (StageError, RuntimeError, KeyError) as exc:
        return {"skipped": f"cannot compare in the champion's feature space ({exc})"}
    result = compare(model, meta, images[0], images[1], batch_size, device)
    return {**result.summary(), "reference_version": version, "champion_run_id": record.get("run_id")}
