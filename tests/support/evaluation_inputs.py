"""Inputs for the baseline, evaluate and promotion tests, made once per session on the loopback S3.

- `small_split`: the real `small_pack` (about 90 images per class from the 28 px pack) ingested by the
  real ingest stage and split (lesion-grouped) by the real split stage.
- `small_models`: train-stage outputs in the seam layout (cnn.pt, cnn_phase1.pt, manifest.json) for
  three real resnet18 (28 px, small stem) checkpoints with known behaviour, so the promotion gate can
  be driven deterministically without minutes of CPU training:
    fitted  random-init backbone, linear head fitted (class-weighted) on its frozen features of the
            train images: a genuine, weak phase-1 style model
    weak    the same network whose head always answers `nv` (macro F1 near zero)
    blind   `fitted` with its melanoma logit suppressed: never predicts `mel` (melanoma recall 0)
    calibrated  `fitted` with the temperature and melanoma threshold train fits on validation
            (dermaops.calibration.fit on its test-time-augmented validation probabilities) in its meta
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from dermaops.dataset import CLASSES, Dataset
from dermaops.stage import Context, fingerprint
from dermaops.store import ArtifactStore, S3Uri

from tests.support.datasets import _ingest

ARCH, SIZE = "resnet18", 28


@pytest.fixture(scope="session")
def small_split(s3_server, shared_bucket, small_pack, tmp_path_factory) -> dict:
    """{dataset_uri, split_uri} of the small pack, lesion-grouped 80/10/10."""
    env = {**os.environ, **s3_server.env}
    dataset = _ingest(small_pack, shared_bucket, env, tmp_path_factory.mktemp("ingest-small"))
    split_uri = f"s3://{shared_bucket}/runs/eval-fixture/split"
    proc = subprocess.run(
        [sys.executable, "-m", "dermaops", "split", "--dataset", dataset["dataset_uri"], "--out", split_uri],
        capture_output=True,
        text=True,
        env={**env, "DERMAOPS_SCRATCH_DIR": str(tmp_path_factory.mktemp("split-small"))},
        timeout=300,
    )
    assert proc.returncode == 0, f"split failed:\n{proc.stderr[-4000:]}"
    return {"dataset_uri": dataset["dataset_uri"], "split_uri": split_uri}


def _train_images(store: ArtifactStore, split: dict, scratch, name: str = "train"):
    import numpy as np
    import pandas as pd
    from dermaops.imagecache import load_images

    train = pd.read_csv(io.BytesIO(store.get_bytes(S3Uri.parse(split["split_uri"]).join(f"{name}.csv"))))
    dataset = Dataset.open(store, split["dataset_uri"], scratch)
    images = load_images(Context(store, scratch), dataset, SIZE).rows(train["image_id"].tolist())
    return images, train["label"].to_numpy(dtype=np.int64, copy=True)


def _fit_head(model, meta, images, labels) -> None:
    """Fit the linear head on the frozen backbone's features (full batch, class-weighted)."""
    import numpy as np
    import torch
    from dermaops.models import to_input

    head = model.fc
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        features = model(to_input(torch.from_numpy(images), meta))
    model.fc = head
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float32)
    weights = torch.from_numpy(counts.sum() / np.maximum(counts, 1) / len(CLASSES))
    target = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), target, weight=weights).backward()
        optimizer.step()


def _publish(store: ArtifactStore, prefix: str, model, meta, scratch) -> str:
    """A finished train output in the seam layout (what `train` publishes, minus history and curves)."""
    from dermaops.checkpoint import save_checkpoint

    out = Context(store, scratch).output(prefix, "train", fingerprint(prefix=prefix))
    for name, phase in (("cnn_phase1.pt", 1), ("cnn.pt", 2)):
        path = save_checkpoint(scratch / prefix.rsplit("/", 1)[-1] / name, model, meta.replace(phase=phase, epoch=1))
        out.put_file(name, path)
    out.publish({"model_uri": str(out.uri("cnn.pt")), "phase1_model_uri": str(out.uri("cnn_phase1.pt"))})
    return prefix


@pytest.fixture(scope="session")
def small_models(small_split, shared_bucket, tmp_path_factory) -> dict[str, str]:
    """{fitted, weak, blind} -> train output prefix (s3://.../models/<name>)."""
    import torch
    from dermaops.checkpoint import CheckpointMeta
    from dermaops.models import build_model

    store = ArtifactStore()
    scratch = tmp_path_factory.mktemp("small-models")
    images, labels = _train_images(store, small_split, scratch)
    meta = CheckpointMeta.for_model(ARCH, CLASSES, SIZE, "auto", "none")
    torch.manual_seed(0)
    model = build_model(ARCH, len(CLASSES), SIZE).eval()
    _fit_head(model, meta, images, labels)
    base = f"s3://{shared_bucket}/runs/eval-fixture/models"
    prefixes = {"fitted": _publish(store, f"{base}/fitted", model, meta, scratch)}

    from dermaops.calibration import fit
    from dermaops.models import predict_proba

    val_images, val_labels = _train_images(store, small_split, scratch, "val")
    fitted = fit(predict_proba(model, val_images, meta, tta=True), val_labels, CLASSES.index("mel"), 0.85)
    prefixes["calibrated"] = _publish(store, f"{base}/calibrated", model, meta.replace(**fitted), scratch)

    with torch.no_grad():
        model.fc.bias[CLASSES.index("mel")] = -1e4
    prefixes["blind"] = _publish(store, f"{base}/blind", model, meta, scratch)

    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[CLASSES.index("nv")] = 1.0
    prefixes["weak"] = _publish(store, f"{base}/weak", model, meta, scratch)
    return prefixes


# The referral target of the guarded model: the small models are weak on purpose (a linear head on a random
# backbone), so the target is one its validation curve reaches part of the way, not the DAG's 0.90.
GUARDED_REFERRAL_ACCURACY = 0.6


@pytest.fixture(scope="session")
def guarded_model(small_split, small_models, shared_bucket, tmp_path_factory) -> str:
    """Train output prefix of the `calibrated` model with the prediction guards train fits after training
    (dermaops.guards.fit_checkpoint, the real function, on the small split's train and validation images): a
    referral threshold, the out-of-distribution detector and the training prior in its meta."""
    import numpy as np
    import torch
    from dermaops.checkpoint import load_checkpoint
    from dermaops.guards import fit_checkpoint
    from dermaops.imagecache import load_images

    store = ArtifactStore()
    scratch = tmp_path_factory.mktemp("guarded")
    path = store.download(S3Uri.parse(small_models["calibrated"]).join("cnn.pt"), scratch / "source.pt")
    train = pd_read(store, small_split, "train")
    val_images, val_labels = _train_images(store, small_split, scratch, "val")
    cache = load_images(Context(store, scratch), Dataset.open(store, small_split["dataset_uri"], scratch), SIZE)
    torch.manual_seed(0)
    fit_checkpoint(
        path,
        cache.rows,
        train["image_id"].tolist(),
        train["label"].to_numpy(dtype=np.int64),
        val_images,
        val_labels,
        referral_accuracy=GUARDED_REFERRAL_ACCURACY,
        ood_tpr=0.95,
        tta=True,
        device="cpu",
    )
    model, meta = load_checkpoint(path)
    prefix = f"s3://{shared_bucket}/runs/eval-fixture/models/guarded"
    return _publish(store, prefix, model, meta, scratch)


def pd_read(store: ArtifactStore, split: dict, name: str):
    import pandas as pd

    return pd.read_csv(io.BytesIO(store.get_bytes(S3Uri.parse(split["split_uri"]).join(f"{name}.csv"))))
