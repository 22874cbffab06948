"""Batch prediction on the full-resolution sample pack (600x450 originals) with a real model promoted
into a real registry on the loopback S3: probabilities through training's preprocessing, calibration
and the melanoma operating point when the model carries them, Grad-CAM, idempotency, one-line errors."""

from __future__ import annotations

import csv
import zipfile

import numpy as np
import pytest
from dermaops.checkpoint import load_checkpoint, save_checkpoint
from dermaops.dataset import CLASSES
from dermaops.imagecache import decode_image
from dermaops.models import predict_proba
from dermaops.predictor import apply_temperature
from dermaops.store import S3Uri

from tests.support.faulty_files import add_zeros_member, jpeg_declaring
from tests.support.registry import copy_registry, read_csv, sample_jpegs

P_COLUMNS = [f"p_{c}" for c in CLASSES]
PNG = b"\x89PNG\r\n\x1a\n"


def _sample_ids(pack_sample) -> set[str]:
    with open(pack_sample / "HAM10000_metadata.csv", newline="") as f:
        return {row["image_id"] for row in csv.DictReader(f)}


def test_champion_predicts_the_full_resolution_sample_through_trainings_preprocessing(
    promoted_registry, pack_sample, run_stage, store, bucket, tmp_path
):
    out = f"s3://{bucket.bucket}/predictions/sample"
    argv = ["predict", "--model", "champion", "--registry", promoted_registry["registry"], "--images", str(pack_sample)]
    summary = run_stage(*argv, "--out", out, "--no-tta").summary
    champion = promoted_registry["champion"]
    assert summary["status"] == "done" and summary["n_images"] == 70
    assert summary["resolved_from"] == "champion" and summary["champion_run_id"] == promoted_registry["run_id"]
    assert (summary["model_uri"], summary["model_sha256"]) == (champion["model_uri"], champion["model_sha256"])
    # The metadata CSV and SHA256SUMS travel with the pack: listed, not predicted.
    assert summary["n_ignored"] == 2
    assert summary["calibration"] == "none" and summary["mel_rule"].startswith("argmax == mel")

    prefix = S3Uri.parse(out)
    table = read_csv(store, prefix.join("predictions.csv"))
    assert len(table) == 70 and set(table["image_id"]) == _sample_ids(pack_sample)
    assert table["image"].str.match(r"HAM10000_images_part_[12]\.zip:ISIC_\d{7}\.jpg").all()
    proba = table[P_COLUMNS].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4) and (proba >= 0).all()
    assert (table["predicted"] == np.array(CLASSES)[proba.argmax(axis=1)]).all()
    assert (table["mel_flag"] == (table["predicted"] == "mel")).all()
    assert sum(summary["predicted_counts"].values()) == 70
    assert summary["n_mel_flagged"] == int(table["mel_flag"].sum())

    # Exactly what the model gives on training's decoding of the original bytes.
    model, meta = load_checkpoint(store.download(champion["model_uri"], tmp_path / "champion.pt"))
    with zipfile.ZipFile(pack_sample / "HAM10000_images_part_2.zip") as zf:
        names = sorted(zf.namelist())[:5]
        pixels = np.stack([decode_image(zf.read(n), meta.image_size) for n in names])
    expected = predict_proba(model, pixels, meta, tta=False)
    rows = table.set_index("image").loc[[f"HAM10000_images_part_2.zip:{n}" for n in names], P_COLUMNS]
    assert np.allclose(rows.to_numpy(), expected, atol=1e-5)

    details = store.get_json(prefix.join("predictions.json"))
    from dermaops.imagecache import CACHE_FORMAT

    assert details["preprocessing"].startswith(f"{CACHE_FORMAT} to 28x28 px (whole picture squashed)")
    assert sorted(details["ignored"]) == ["HAM10000_metadata.csv", "SHA256SUMS"]
    manifest = store.get_json(prefix.join("manifest.json"))
    assert {"predictions.csv", "predictions.json"} <= set(manifest["files"])

    again = run_stage(*argv, "--out", out, "--no-tta").summary
    assert again["status"] == "skipped" and again["predictions_uri"] == summary["predictions_uri"]


def test_temperature_and_operating_point_are_used_and_reported(
    promoted_registry, pack_sample, run_stage, store, bucket, tmp_path
):
    """A checkpoint carrying `temperature` and `mel_threshold` in its meta: calibrated probabilities and
    the threshold rule; a champion.json mel_threshold wins over the checkpoint's."""
    images = tmp_path / "jpegs"
    sample_jpegs(pack_sample, images, count=6)
    root = f"s3://{bucket.bucket}"
    plain = run_stage(
        "predict",
        "--model",
        "champion",
        "--registry",
        promoted_registry["registry"],
        "--images",
        str(images),
        "--out",
        f"{root}/predictions/plain",
        "--no-tta",
    ).summary
    assert plain["calibration"] == "none"
    before = read_csv(store, S3Uri.parse(plain["predictions_uri"]))[P_COLUMNS].to_numpy()

    model, meta = load_checkpoint(store.download(promoted_registry["champion"]["model_uri"], tmp_path / "c.pt"))
    calibrated = meta.replace(temperature=2.0, mel_threshold=0.05)
    calibrated_ckpt = save_checkpoint(tmp_path / "calibrated.pt", model, calibrated)
    ckpt_uri = store.put_file(S3Uri.parse(f"{root}/models/calibrated/cnn.pt"), calibrated_ckpt)
    summary = run_stage(
        "predict",
        "--model",
        str(ckpt_uri),
        "--images",
        str(images),
        "--out",
        f"{root}/predictions/calibrated",
        "--no-tta",
    ).summary
    assert summary["resolved_from"] == "uri" and summary["calibration"] == "temperature 2 (checkpoint meta)"
    assert summary["mel_rule"] == "p(mel) >= 0.0500 (mel_threshold from checkpoint meta)"
    table = read_csv(store, S3Uri.parse(summary["predictions_uri"]))
    after = table[P_COLUMNS].to_numpy()
    assert np.allclose(after, apply_temperature(before, 2.0), atol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)  # T = 2 flattens the distribution
    assert (table["mel_flag"] == (table["p_mel"] >= 0.05)).all()

    # The registry's operating point moves without a new checkpoint: champion.json wins.
    registry = copy_registry(store, promoted_registry["registry"], bucket.join("registry", "ham10000"))
    store.put_json(registry.join("champion.json"), {**promoted_registry["champion"], "mel_threshold": 0.99})
    moved = run_stage(
        "predict",
        "--model",
        "champion",
        "--registry",
        str(registry),
        "--images",
        str(images),
        "--out",
        f"{root}/predictions/plain",
        "--no-tta",
    ).summary
    assert moved["status"] == "done"  # a new operating point is a new result, not a skip
    assert moved["mel_rule"] == "p(mel) >= 0.9900 (mel_threshold from champion.json)"
    flags = read_csv(store, S3Uri.parse(moved["predictions_uri"]))
    assert (flags["mel_flag"] == (flags["p_mel"] >= 0.99)).all()


def test_s3_prefix_with_gradcam(promoted_registry, pack_sample, run_stage, store, bucket, tmp_path):
    prefix = bucket.join("incoming", "ham10000", "batch-1")
    for path in sample_jpegs(pack_sample, tmp_path / "jpegs", count=3):
        store.put_file(prefix.join(path.name), path)
    out = S3Uri.parse(f"s3://{bucket.bucket}/predictions/gradcam")
    summary = run_stage(
        "predict",
        "--model",
        "champion",
        "--registry",
        promoted_registry["registry"],
        "--images",
        str(prefix),
        "--out",
        str(out),
        "--gradcam",
        "mel",
    ).summary
    assert summary["n_images"] == 3 and summary["tta"] is True and summary["gradcam"] == "mel"
    table = read_csv(store, out.join("predictions.csv"))
    assert list(table["image"]) == sorted(p.name for p in (tmp_path / "jpegs").iterdir())
    for uri in table["gradcam"]:
        assert uri.startswith(f"{out}/gradcam/") and store.get_bytes(S3Uri.parse(uri)).startswith(PNG)


@pytest.mark.parametrize(
    "case",
    ["png", "empty", "corrupt", "bomb", "header_mismatch", "zip_bomb", "no_champion", "bad_model"],
)
def test_bad_input_is_one_line_exit_2_naming_it(case, promoted_registry, pack_sample, run_stage, bucket, tmp_path):
    images = tmp_path / "folder"
    sample_jpegs(pack_sample, images, count=2)
    registry = promoted_registry["registry"]
    model = "champion"
    if case == "png":
        from PIL import Image

        Image.new("RGB", (20, 20)).save(images / "scan.png")
        expected = "scan.png is not a JPEG (a PNG image)"
    elif case == "empty":
        images = tmp_path / "empty"
        (images / "sub").mkdir(parents=True)
        (images / "notes.txt").write_text("nothing here")
        expected = f"--images {images}: no JPEG image found (only notes.txt there)"
    elif case == "corrupt":
        first = sorted(images.iterdir())[0]
        first.write_bytes(first.read_bytes()[:600])
        expected = f"{first.name} is not a readable JPEG"
    elif case == "bomb":  # a decompression bomb: crashed with PIL's DecompressionBombError (exit 1, retried)
        first = sorted(images.iterdir())[0]
        first.write_bytes(jpeg_declaring(first.read_bytes(), 30000, 30000))
        expected = f"--images {images}: {first.name} declares 30000x30000 pixels, over the limit of 50 megapixels"
    elif case == "header_mismatch":  # libjpeg made up the missing rows, and the image was predicted
        first = sorted(images.iterdir())[0]
        first.write_bytes(jpeg_declaring(first.read_bytes(), 600, 900))
        expected = f"{first.name} is a corrupt JPEG: its header declares 600x900 pixels but its image data ends"
    elif case == "zip_bomb":  # 10 MiB of zeros in a few KB: refused before the batch starts
        add_zeros_member(images / "batch.zip", "ISIC_0000001.jpg", 10 * 2**20)
        expected = f"--images {images}: batch.zip: member ISIC_0000001.jpg declares 10,485,760 bytes from"
    elif case == "no_champion":
        registry = f"s3://{bucket.bucket}/registry/elsewhere"
        expected = f"no champion at {registry}/champion.json: no model has been promoted yet"
    else:
        model = "resnet18.pt"
        expected = "--model 'resnet18.pt': expected 'champion' or an s3:// URI"
    result = run_stage(
        "predict",
        "--model",
        model,
        "--registry",
        registry,
        "--images",
        str(images),
        "--out",
        f"s3://{bucket.bucket}/predictions/{case}",
        "--no-tta",
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.error_line.startswith("dermaops predict: error:") and expected in result.error_line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--batch-size", "0"), "dermaops predict: error: --batch-size must be 1..4096, got 0"),
        (("--gradcam", "all"), "invalid choice: 'all' (choose from 'none', 'predicted', 'mel')"),
        (("--max-ood-rate", "1.5"), "dermaops predict: error: --max-ood-rate must be"),
    ],
)
def test_settings_are_checked_from_predicts_config_before_any_work(flags, expected, run_stage, bucket, tmp_path):
    """predict's settings come from PredictConfig (bounds, choices, the form's params): a bad one is one line,
    exit 2, before an image or a model is looked at (the folder here does not even exist)."""
    out = f"s3://{bucket.bucket}/predictions/bad-setting"
    result = run_stage(
        "predict", "--model", "champion", "--images", str(tmp_path / "none"), "--out", out, *flags, check=False
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
