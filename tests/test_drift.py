"""Drift of a dataset version against the champion's training data (dermaops.drift), on the real 28 px data:
the same population gives no alarm, darkened images and a removed class do; the validate stage reports it
in the data-quality report, and its drift policy decides whether the run goes on."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dermaops import drift
from dermaops.run_report import build_report, slack_message
from PIL import Image, ImageEnhance

from tests.support.pipeline_packs import ARCHIVES, write_subset_pack


def _metadata(pack: Path) -> pd.DataFrame:
    return pd.read_csv(pack / "HAM10000_metadata.csv")


def _images(pack: Path):
    for archive in ARCHIVES:
        with zipfile.ZipFile(pack / archive) as zf:
            for name in zf.namelist():
                yield name.rsplit(".", 1)[0], archive, zf.read(name)


def darken(pack: Path, dest: Path, factor: float = 0.5) -> Path:
    """A copy of a pack whose every image is darkened (PIL brightness `factor`), metadata unchanged."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "HAM10000_metadata.csv").write_bytes((pack / "HAM10000_metadata.csv").read_bytes())
    for archive in ARCHIVES:
        with zipfile.ZipFile(pack / archive) as src, zipfile.ZipFile(dest / archive, "w") as out:
            for member in src.infolist():
                image = Image.open(io.BytesIO(src.read(member))).convert("RGB")
                buffer = io.BytesIO()
                ImageEnhance.Brightness(image).enhance(factor).save(buffer, "JPEG", quality=90)
                out.writestr(member.filename, buffer.getvalue())
    return dest


@pytest.fixture(scope="module")
def packs(pack_28px, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift-packs")
    base = write_subset_pack(pack_28px, root / "base", 90, seed=7)
    return {
        "base": base,
        "other": write_subset_pack(pack_28px, root / "other", 90, seed=11),  # other lesions, same population
        "dark": darken(base, root / "dark"),
    }


def _stats(pack: Path) -> pd.DataFrame:
    return drift.image_stats_table(_images(pack), len(_metadata(pack)), 2000)


def test_psi_is_zero_for_equal_histograms_and_grows_with_the_shift():
    assert drift.psi([10, 20, 70], [10, 20, 70]) == 0.0
    small, large = drift.psi([50, 50], [55, 45]), drift.psi([50, 50], [90, 10])
    assert 0 < small < 0.1 < drift.DEFAULT_PSI < large


def test_same_population_is_not_drift_but_darkened_images_and_a_removed_class_are(packs):
    base_meta, base_stats = _metadata(packs["base"]), _stats(packs["base"])
    other = drift.compare("v-base", "v-other", base_meta, _metadata(packs["other"]), base_stats, _stats(packs["other"]))
    assert not other.detected, other.headline()
    assert other.summary()["max_psi"] < drift.DEFAULT_PSI

    dark = drift.compare("v-base", "v-dark", base_meta, _metadata(packs["dark"]), base_stats, _stats(packs["dark"]))
    drifted = {c.feature for c in dark.drifted}
    assert {"brightness", "mean_r", "mean_g", "mean_b"} <= drifted, dark.headline()
    assert not drifted & {"dx", "age", "sex", "localization", "width", "height"}  # the metadata did not change
    brightness = next(c for c in dark.comparisons if c.feature == "brightness")
    assert brightness.psi > 1.0 and brightness.p_value < 1e-6

    no_nv = base_meta[base_meta["dx"] != "nv"]
    removed = drift.compare("v-base", "v-no-nv", base_meta, no_nv, base_stats, base_stats)
    label = removed.comparisons[0]
    assert (label.feature, label.drifted) == ("dx", True) and label.p_value < 1e-6
    assert "dx" in removed.summary()["drifted"]


def test_image_statistics_measure_what_they_name():
    grey = Image.fromarray(np.full((20, 30, 3), 128, np.uint8))
    checker = Image.fromarray(((np.indices((20, 30)).sum(axis=0) % 2) * 255).astype(np.uint8)).convert("RGB")
    flat, sharp = (drift.image_stats(_jpeg(i, "PNG")) for i in (grey, checker))
    assert (flat["width"], flat["height"]) == (30.0, 20.0)
    assert abs(flat["brightness"] - 128 / 255) < 1e-3 and flat["sharpness"] < 1e-6
    assert sharp["sharpness"] > 1.0 and sharp["std_r"] > 0.4
    assert drift.image_stats(b"not an image") is None


def _jpeg(image, fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _ingest(run_stage, pack: Path, datasets: str) -> dict:
    return run_stage("ingest", "--source", str(pack), "--datasets", datasets).summary


@pytest.mark.slow
def test_validate_reports_drift_and_its_policy_decides(run_stage, packs, store, bucket):
    datasets = f"s3://{bucket.bucket}/datasets/ham10000"
    base, dark, other = (_ingest(run_stage, packs[name], datasets) for name in ("base", "dark", "other"))
    registry = bucket.join("registry", "ham10000")
    # The champion's record, as far as validate reads it: which dataset version it was trained on.
    record = {"run_id": "run-base", "model_uri": "s3://x/cnn.pt", "model_sha256": "0" * 64}
    store.put_json(registry.join("champion.json"), {**record, "dataset_version": base["dataset_version"]})

    def validate(dataset: dict, out: str, policy: str, check: bool = True):
        argv = ["--dataset", dataset["dataset_uri"], "--out", f"s3://{bucket.bucket}/runs/{out}/validation"]
        return run_stage("validate", *argv, "--drift-registry", str(registry), "--drift-policy", policy, check=check)

    failed = validate(dark, "dark-fail", "fail", check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.error_line.startswith("dermaops validate: error: data drift with --drift-policy fail")
    assert "brightness" in failed.error_line and base["dataset_version"] in failed.error_line
    validation = bucket.join("runs", "dark-fail", "validation")
    report = store.get_bytes(validation.join("dq_report.md")).decode()  # published before failing
    assert "## Drift against the champion's data" in report and "**DRIFT**" in report
    assert "![drift: PSI per feature](drift.png)" in report and "| image | `brightness` |" in report
    assert store.get_bytes(validation.join("drift.png"))[:4] == b"\x89PNG"
    assert json.loads(store.get_bytes(validation.join("drift.json")))["detected"] is True

    warned = validate(dark, "dark-warn", "warn").summary
    assert warned["drift"]["detected"] is True and warned["drift"]["policy"] == "warn"
    assert warned["drift"]["drifted"]["brightness"] > 1.0
    # notify turns the warn policy's finding into a warning in the Slack message.
    results = {"validate": {"summary": warned, "error": None}}
    message = slack_message(build_report("d", "r", {"validate": "success"}, results, "s3://b/r.md"))
    assert ":warning: *Data drift*: drift against " in json.dumps(message[1]) and "(drift policy warn)" in message[0]

    calm = validate(other, "other", "fail").summary  # other lesions of the same population: no alarm
    assert calm["drift"]["detected"] is False and calm["drift"]["max_psi"] < drift.DEFAULT_PSI
    same = validate(base, "base", "fail").summary
    assert same["drift"] == {
        "detected": False,
        "policy": "fail",
        "headline": "no comparison needed: the champion (run run-base) was trained on this version",
    }


def _decoded(pack: Path, size: int = 28) -> np.ndarray:
    from dermaops.imagecache import decode_image

    return np.stack([decode_image(data, size) for _, _, data in sorted(_images(pack))])


def test_the_champions_feature_space_separates_darkened_images_but_not_the_same_population(packs):
    """A resnet18 as the registry fixtures' champion is (seeded random backbone): its penultimate embeddings."""
    import torch
    from dermaops import feature_drift
    from dermaops.checkpoint import CheckpointMeta
    from dermaops.dataset import CLASSES
    from dermaops.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), 28).eval()
    meta = CheckpointMeta.for_model("resnet18", CLASSES, 28, "auto", "none")
    base, other, dark = (_decoded(packs[name]) for name in ("base", "other", "dark"))
    same = feature_drift.compare(model, meta, base, other, 128, "cpu")
    shifted = feature_drift.compare(model, meta, base, dark, 128, "cpu")
    print(f"domain AUC: same population {same.auc:.3f} (MMD2 {same.mmd2:.4f}), darkened {shifted.auc:.3f} "
          f"(MMD2 {shifted.mmd2:.4f})")  # fmt: skip
    assert same.n_per_dataset == min(len(base), len(other)) > 600
    assert same.auc < feature_drift.DEFAULT_AUC and not same.drifted
    assert shifted.auc > 0.95 and shifted.drifted and shifted.mmd2 > 10 * max(same.mmd2, 1e-6)
    assert feature_drift.sample_ids(["b", "a", "c"], 2) == feature_drift.sample_ids(["c", "b", "a"], 2)
