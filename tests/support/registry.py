"""A real model registry on the loopback S3: the `fitted` small model (tests/support/evaluation_inputs.py,
a resnet18 head fitted on the real 28 px subset) promoted by dermaops.promotion's own gate, with its
evaluation written by the real evaluate stage.

`promoted_registry(bucket)` -> {registry, run_id, champion, evaluation}: for the batch prediction,
model card and registry view tests.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from dermaops.store import ArtifactStore, S3Uri


def evaluate_and_promote(bucket: str, split: dict, model_prefix: str, run_id: str, scratch, floor: float = 0.0) -> dict:
    """Run the real evaluate stage with --registry: writes runs/<run_id>/evaluation and the gate's decision."""
    root = f"s3://{bucket}"
    env = {**os.environ, "DERMAOPS_SCRATCH_DIR": str(scratch)}
    baseline = f"{root}/runs/{run_id}/models/baseline"
    # The gate wants the run's own Random Forest beaten, even by a first champion: a forest of stumps here,
    # since the small models are weak on purpose (a linear head on a random backbone).
    stumps = ["train_baseline", "--split", split["split_uri"], "--out", baseline, "--n-estimators", "10"]
    fitted = subprocess.run(
        [sys.executable, "-m", "dermaops", *stumps, "--max-depth", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert fitted.returncode == 0, f"train_baseline failed:\n{fitted.stderr[-4000:]}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dermaops",
            "evaluate",
            "--split",
            split["split_uri"],
            "--model",
            model_prefix,
            "--baseline",
            baseline,
            "--out",
            f"{root}/runs/{run_id}/evaluation",
            "--registry",
            f"{root}/registry/ham10000",
            "--run-id",
            run_id,
            "--mel-recall-floor",
            str(floor),
            # The absolute floors are off: these small models exist to exercise the registry, not to be good.
            "--min-macro-f1",
            "0",
            "--min-macro-auc",
            "0",
            "--gradcam-images",
            "4",
            "--no-tta",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"evaluate failed:\n{proc.stderr[-4000:]}"
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def promoted_registry(small_split, small_models, s3_server, tmp_path_factory) -> dict:
    """A session bucket whose registry has the `fitted` model as champion, promoted by the real evaluate
    stage (so the run's evaluation folder, report and plots exist too). Read-only for tests: a test that
    changes champion.json copies the registry first (copy_registry)."""
    import uuid

    name = f"registry-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore()
    store.ensure_bucket(name)
    run_id = "run-fitted"
    # The DAG's layout: the run's train output at runs/<run_id>/models/cnn, its evaluation beside it.
    source, model = S3Uri.parse(small_models["fitted"]), S3Uri(name, f"runs/{run_id}/models/cnn")
    for uri, _ in store.list(source):
        store.put_bytes(model.join(uri.name), store.get_bytes(uri))
    summary = evaluate_and_promote(name, small_split, str(model), run_id, tmp_path_factory.mktemp("ev"))
    assert summary["promoted"] is True, summary
    registry = S3Uri(name, "registry/ham10000")
    return {
        "bucket": name,
        "registry": str(registry),
        "run_id": run_id,
        "champion": store.get_json(registry.join("champion.json")),
        "evaluation": f"s3://{name}/runs/{run_id}/evaluation",
        "summary": summary,
    }


def copy_registry(store: ArtifactStore, registry: str, dest: S3Uri) -> S3Uri:
    """champion.json and history/ of `registry` under `dest` (model_uri keeps pointing at the original copy)."""
    source = S3Uri.parse(registry)
    for uri, _ in store.list(source):
        relative = uri.key[len(source.key) + 1 :]
        if not relative.startswith("models/"):
            store.put_bytes(dest.join(relative), store.get_bytes(uri))
    return dest


def sample_jpegs(pack_sample, dest, count: int | None = None) -> list:
    """The first `count` full-resolution JPEGs of the sample pack, extracted byte for byte into `dest`."""
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for archive in ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip"):
        with zipfile.ZipFile(pack_sample / archive) as zf:
            for name in sorted(zf.namelist()):
                if count is not None and len(written) >= count:
                    return written
                (dest / name).write_bytes(zf.read(name))
                written.append(dest / name)
    return written


def read_csv(store: ArtifactStore, uri: S3Uri):
    import pandas as pd

    return pd.read_csv(io.BytesIO(store.get_bytes(uri)))
