"""The validate stage on real data: the real 28 px pack's figures, and corrupted copies of the real
full-resolution sample pack, published by the real ingest stage and validated as a subprocess."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dermaops.dataset import MASKS_ARCHIVE
from dermaops.frame import Frame
from dermaops.imagecache import decode_mask
from dermaops.mask_facts import build_mask_facts
from dermaops.store import S3Uri
from PIL import Image, ImageFilter, ImageOps

from tests.support.mask_packs import link_pack, write_masks_zip

ROOT = Path(__file__).resolve().parents[1]


def _read_rows(pack: Path) -> tuple[list[str], list[dict]]:
    with open(pack / "HAM10000_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _write_rows(pack: Path, header: list[str], rows: list[dict]) -> None:
    with open(pack / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _image_bytes(pack: Path) -> dict[str, bytes]:
    found = {}
    for archive in sorted(pack.glob("HAM10000_images_part_*.zip")):
        with zipfile.ZipFile(archive) as zf:
            found.update({Path(name).stem: zf.read(name) for name in zf.namelist()})
    return found


def _rewrite_images(pack: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> None:
    """Replace members' bytes by image_id, keeping every archive's member order; `add` goes to part 2."""
    for archive in sorted(pack.glob("HAM10000_images_part_*.zip")):
        with zipfile.ZipFile(archive) as zf:
            members = [(name, zf.read(name)) for name in zf.namelist()]
        if archive.name.endswith("part_2.zip"):
            members += [(f"{image_id}.jpg", data) for image_id, data in (add or {}).items()]
        archive.unlink()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members:
                zf.writestr(name, replace.get(Path(name).stem, data))


def _copy_pack(pack: Path, dst: Path) -> Path:
    """A writable copy of a read-only pack, without SHA256SUMS: the copy is changed on purpose."""
    dst.mkdir()
    for path in pack.iterdir():
        if path.name != "SHA256SUMS":
            shutil.copyfile(path, dst / path.name)
    return dst


def _ingest(run_stage, source: Path, bucket: S3Uri, check: bool = True):
    return run_stage(
        "ingest", "--source", str(source), "--datasets", str(bucket.join("datasets/ham10000")), check=check
    )


def _validate(run_stage, dataset_uri: str, out: S3Uri, *extra: str, check: bool = True, env: dict | None = None):
    return run_stage("validate", "--dataset", dataset_uri, "--out", str(out), *extra, check=check, env=env)


def test_real_28px_pack_report_figures_and_outputs(run_stage, dataset_28px, bucket, store):
    out = bucket.join("runs/r28/validation")
    run = _validate(run_stage, dataset_28px["dataset_uri"], out)
    summary = run.summary
    assert summary["status"] == "done" and summary["success"] is True
    assert summary["n_rows"] == 10015 and summary["n_images"] == 10015
    assert summary["class_counts"] == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    assert summary["imbalance_ratio"] == 58.3
    assert summary["missing_age"] == 57 and summary["missing_age_percent"] == 0.57
    # The real pack holds two pairs of byte-identical files, each pair within ONE lesion: reported,
    # not fatal (a lesion-grouped split keeps them together).
    assert summary["critical_failures"] == []
    assert summary["failed_expectations"] == 1
    assert "expect_column_values_to_be_unique(sha256)" in summary["findings"][0]

    report = store.get_bytes(summary["report_uri"]).decode()
    assert "10,015 rows" in report
    assert "| nv | melanocytic nevi | 6,705 | 66.95 % |" in report
    assert "| df | dermatofibroma | 115 | 1.15 % |" in report
    assert "**58.3:1** (nv 6,705 / df 115)" in report
    assert "| `age` | 57 | 0.57 % |" in report
    assert "ISIC_0024366 = ISIC_0029861 (one lesion HAM_0002300)" in report
    assert "**PASSED**" in report
    # DermaMNIST has no lesion masks: reported in the summary and the report, not a failure.
    no_masks = f"dataset version {summary['dataset_version']} has no lesion masks (its source had no {MASKS_ARCHIVE})"
    assert summary["masks"] == {"present": False, "note": no_masks}
    assert f"## Lesion masks\n\nNone: {no_masks}. Not a failure" in report
    assert not store.exists(out.join("results/ham10000_masks.json")) and not store.exists(out.join("mask_facts.csv"))

    for suite in ("ham10000_metadata", "ham10000_images"):
        result = store.get_json(out.join(f"results/{suite}.json"))
        assert result["suite_name"] == suite
        assert result["statistics"]["evaluated_expectations"] >= 8
    metadata_result = store.get_json(out.join("results/ham10000_metadata.json"))
    assert metadata_result["success"] is True
    age_not_null = next(
        r
        for r in metadata_result["results"]
        if r["expectation_config"]["type"] == "expect_column_values_to_not_be_null"
        and r["expectation_config"]["kwargs"]["column"] == "age"
    )
    assert age_not_null["result"]["unexpected_count"] == 57
    assert age_not_null["expectation_config"]["kwargs"]["mostly"] == pytest.approx(0.98)

    docs = {uri.key.removeprefix(out.key + "/") for uri, _ in store.list(out.join("data_docs"))}
    assert "data_docs/index.html" in docs
    assert any(d.startswith("data_docs/validations/ham10000_metadata/") and d.endswith(".html") for d in docs)
    assert any(d.startswith("data_docs/validations/ham10000_images/") and d.endswith(".html") for d in docs)
    assert "ham10000_images" in store.get_bytes(summary["data_docs_uri"]).decode()

    chart = Image.open(io.BytesIO(store.get_bytes(summary["chart_uri"])))
    assert chart.format == "PNG" and chart.width > 300
    facts = list(csv.DictReader(io.StringIO(store.get_bytes(summary["image_facts_uri"]).decode())))
    assert len(facts) == 10015
    assert {(f["decodes"], f["mode"], f["width"], f["height"], f["format"]) for f in facts} == {
        ("True", "RGB", "28", "28", "JPEG")
    }

    manifest = store.get_json(out.join("manifest.json"))
    assert manifest["summary"]["success"] is True
    assert {"dq_report.md", "class_distribution.png", "image_facts.csv", "data_docs/index.html"} <= set(
        manifest["files"]
    )

    again = _validate(run_stage, dataset_28px["dataset_uri"], out)
    assert again.summary["status"] == "skipped"
    assert again.summary["class_counts"] == summary["class_counts"]
    assert store.get_json(out.join("manifest.json"))["created_at"] == manifest["created_at"]


def test_corrupted_pack_fails_naming_every_critical_expectation_and_keeps_the_report(
    run_stage, pack_sample, bucket, store, tmp_path
):
    pack = _copy_pack(pack_sample, tmp_path / "corrupt")
    header, rows = _read_rows(pack)
    ids = [row["image_id"] for row in rows]
    rows[0]["dx"] = "melanoma"
    rows[1]["sex"] = "M"
    rows[2]["age"] = "150.0"
    rows.append(dict(rows[3]))  # the same image_id twice
    _write_rows(pack, header, rows)
    images = _image_bytes(pack)
    not_an_image = b"<html>404 Not Found</html>\n"
    # ids[5] gets ids[6]'s file: byte-identical images of two different lesions.
    _rewrite_images(pack, {ids[4]: not_an_image, ids[5]: images[ids[6]]})
    dataset_uri = _ingest(run_stage, pack, bucket).summary["dataset_uri"]

    out = bucket.join("runs/bad/validation")
    run = _validate(run_stage, dataset_uri, out, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stdout.strip() == ""
    line = run.error_line
    assert len([x for x in run.stderr.splitlines() if x.startswith("dermaops validate: error")]) == 1
    assert line.startswith(f"dermaops validate: error: validation of {dataset_uri} failed 6 critical expectation(s)")
    assert f"expect_column_values_to_be_in_set(dx): 1 unexpected of 71, e.g. {ids[0]}=melanoma" in line
    assert f"expect_column_values_to_be_in_set(sex): 1 unexpected of 71, e.g. {ids[1]}=M" in line
    assert f"expect_column_values_to_be_between(age): 1 unexpected of 71, e.g. {ids[2]}=150.0" in line
    assert f"expect_column_values_to_be_unique(image_id): 2 unexpected of 71, e.g. {ids[3]}, {ids[3]}" in line
    assert f"expect_column_values_to_be_in_set(decodes): 1 unexpected of 70, e.g. {ids[4]}=False" in line
    assert "expect_column_values_to_be_between(lesions_with_same_bytes): 2 unexpected of 70" in line
    assert ids[5] in line and ids[6] in line
    assert f"(report: {out.join('dq_report.md')})" in line

    # The outputs are published with the verdict, so people (and notify) can read why.
    manifest = store.get_json(out.join("manifest.json"))
    assert manifest["summary"]["success"] is False
    assert len(manifest["summary"]["critical_failures"]) == 6
    report = store.get_bytes(out.join("dq_report.md")).decode()
    assert "**FAILED**: 6 critical expectation(s) not met" in report
    assert "| melanoma | not a HAM10000 class | 1 | 1.41 % |" in report
    assert f"failed: 1 ({ids[4]} (UnidentifiedImageError" in report
    assert f"({ids[5]} = {ids[6]} (2 lesions" in report or f"({ids[6]} = {ids[5]} (2 lesions" in report
    assert store.get_json(out.join("results/ham10000_images.json"))["success"] is False
    assert store.exists(out.join("data_docs/index.html"))

    # Same inputs, same verdict: the stored result is reported again without redoing the work.
    again = _validate(run_stage, dataset_uri, out, check=False)
    assert again.returncode == 2 and again.error_line == line
    assert "already done" in again.stderr
    assert store.get_json(out.join("manifest.json"))["created_at"] == manifest["created_at"]


def test_non_critical_findings_are_reported_and_bad_inputs_touch_nothing(
    run_stage, pack_sample, bucket, store, tmp_path
):
    pack = _copy_pack(pack_sample, tmp_path / "findings")
    header, rows = _read_rows(pack)
    for row in rows[:5]:
        row["age"] = ""
    _write_rows(pack, header, rows)
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(_image_bytes(pack)[rows[0]["image_id"]]))).save(mirrored, "JPEG")
    _rewrite_images(pack, {}, add={"ISIC_9999999": mirrored.getvalue()})
    dataset_uri = _ingest(run_stage, pack, bucket).summary["dataset_uri"]

    out = bucket.join("runs/findings/validation")
    summary = _validate(run_stage, dataset_uri, out).summary
    assert summary["success"] is True
    assert summary["n_rows"] == 70 and summary["n_images"] == 71
    assert summary["class_counts"] == dict.fromkeys(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], 10)
    assert summary["imbalance_ratio"] == 1.0
    assert summary["missing_age"] == 5
    # 2 findings, plus the class shares of a balanced pack (1/7 each) outside the HAM10000 bounds of
    # akiec, bcc, df, nv and vasc (bkl and mel, about 11 % in HAM10000, are within theirs).
    assert summary["failed_expectations"] == 7
    findings = " | ".join(summary["findings"])
    shares = [f for f in summary["findings"] if f.startswith("ham10000_classes:")]
    assert len(shares) == 5 and all("expect_column_values_to_be_between(share)" in f for f in shares)
    assert "ham10000_metadata: expect_column_values_to_not_be_null(age): 5 unexpected of 70" in findings
    assert "expect_column_values_to_be_in_set(in_metadata): 1 unexpected of 71, e.g. ISIC_9999999=False" in findings
    report = store.get_bytes(summary["report_uri"]).decode()
    assert "| `age` | 5 | 7.14 % |" in report
    assert "sizes (width x height): 600x450 71\n" in report
    assert "images without a metadata row: 1" in report

    # Bad flags, suites and inputs fail in one line before anything is written, even with --force.
    manifest = store.get_bytes(out.join("manifest.json"))
    broken = tmp_path / "expectations"
    shutil.copytree(ROOT / "expectations", broken)
    suite = json.loads((broken / "ham10000_metadata.json").read_text())
    suite["expectations"].append({"type": "expect_column_values_to_be_purple", "kwargs": {"column": "dx"}})
    (broken / "ham10000_metadata.json").write_text(json.dumps(suite))
    missing_dataset = str(bucket.join("datasets/ham10000/vnothere"))
    cases = [
        (["--max-missing-age-fraction", "1.5"], None, "--max-missing-age-fraction must be 0..1, got 1.5"),
        (["--min-rows", "100", "--max-rows", "10"], None, "need --min-rows <= --max-rows (got 100 and 10)"),
        (
            ["--min-lesion-share", "0.5", "--max-lesion-share", "0.2"],
            None,
            "need --min-lesion-share <= --max-lesion-share (got 0.5 and 0.2)",
        ),
        (["--expectations", str(tmp_path / "nowhere")], None, "expectations directory not found"),
        # The default suites directory comes from $DERMAOPS_EXPECTATIONS_DIR (container images set it).
        (
            [],
            {"DERMAOPS_EXPECTATIONS_DIR": str(broken)},
            f"expectation #16 (expect_column_values_to_be_purple) in {broken}",
        ),
        (["--dataset", missing_dataset], None, f"no finished dataset version at {missing_dataset}"),
    ]
    for flags, env, reason in cases:
        run = _validate(run_stage, dataset_uri, out, "--force", *flags, check=False, env=env)
        assert run.returncode == 2, (flags, run.stderr)
        assert reason in run.error_line, (flags, run.error_line)
        assert "Traceback" not in run.stderr
        assert store.get_bytes(out.join("manifest.json")) == manifest

    # The same missing ages are within a looser stated fraction: no finding then.
    looser = _validate(run_stage, dataset_uri, out, "--max-missing-age-fraction", "0.1").summary
    assert looser["status"] == "done" and looser["failed_expectations"] == 6  # the 5 class-share findings
    assert "(age)" not in " ".join(looser["findings"])


def test_ingest_rejects_a_metadata_file_without_a_required_column(run_stage, pack_sample, bucket, tmp_path):
    pack = _copy_pack(pack_sample, tmp_path / "nocolumn")
    header, rows = _read_rows(pack)
    header.remove("dx")
    _write_rows(pack, header, [{k: v for k, v in row.items() if k != "dx"} for row in rows])
    run = _ingest(run_stage, pack, bucket, check=False)
    assert run.returncode == 2
    assert "lacks required columns ['dx']" in run.error_line


def test_a_class_distribution_the_split_cannot_stratify_fails_validation(run_stage, pack_sample, bucket, tmp_path):
    """The issue's reproduction: 70 nv and 1 mel passed validation, and the split failed later."""
    pack = _copy_pack(pack_sample, tmp_path / "skewed")
    header, rows = _read_rows(pack)
    for i, row in enumerate(rows):
        row["dx"] = "mel" if i == 0 else "nv"
    _write_rows(pack, header, rows)
    dataset_uri = _ingest(run_stage, pack, bucket).summary["dataset_uri"]

    run = _validate(run_stage, dataset_uri, bucket.join("runs/skewed/validation"), check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.error_line
    assert line.startswith(f"dermaops validate: error: validation of {dataset_uri} failed 2 critical expectation(s)")
    # The examples name the classes (they said "e.g. 0, 0, 0, 0, 0").
    assert (
        "ham10000_classes: expect_column_values_to_be_between(n_images): 5 unexpected of 7, "
        "e.g. akiec=0, bcc=0, bkl=0, df=0, vasc=0" in line
    )
    assert (
        "ham10000_classes: expect_column_values_to_be_between(n_lesions): 6 unexpected of 7, "
        "e.g. akiec=0, bcc=0, bkl=0, df=0, mel=1" in line
    )

    # The bound is a flag: asking for more lesions per class than a pack has fails the same way.
    balanced = _ingest(run_stage, _copy_pack(pack_sample, tmp_path / "balanced"), bucket).summary["dataset_uri"]
    strict = _validate(
        run_stage, balanced, bucket.join("runs/strict/validation"), "--min-lesions-per-class", "50", check=False
    )
    assert strict.returncode == 2 and "expect_column_values_to_be_between(n_lesions): 7 unexpected of 7" in (
        strict.error_line
    )


# -- lesion masks ----------------------------------------------------------------------------------


def test_real_200px_masks_pass_and_are_reported(run_stage, dataset_200px, bucket, store):
    out = bucket.join("runs/r200/validation")
    summary = _validate(run_stage, dataset_200px["dataset_uri"], out).summary
    assert summary["success"] is True and summary["critical_failures"] == []
    masks = summary["masks"]
    assert masks["present"] is True and masks["archive"] == MASKS_ARCHIVE
    assert (masks["n_masks"], masks["images_without_mask"], masks["masks_without_image"]) == (10015, 0, 0)
    assert (masks["duplicated"], masks["undecodable"]) == (0, 0)
    # The measured distribution validate.py's bounds are chosen from.
    assert masks["lesion_share"] == {
        "min": 0.0039,
        "p1": 0.0145,
        "p5": 0.0387,
        "median": 0.2223,
        "p95": 0.6385,
        "p99": 0.8345,
        "max": 1.0,
    }

    facts = list(csv.DictReader(io.StringIO(store.get_bytes(masks["mask_facts_uri"]).decode())))
    assert len(facts) == 10015
    assert {(f["has_mask"], f["has_image"], f["decodes"], f["width"], f["height"], f["size_fit"]) for f in facts} == {
        ("True", "True", "True", "600", "450", "original")
    }
    by_id = {f["image_id"]: f for f in facts}
    # Two real masks are all lesion (close-ups whose lesion fills the frame): binary, within bounds.
    assert {i for i, f in by_id.items() if f["values"] == "255"} == {"ISIC_0026042", "ISIC_0029819"}
    assert {f["values"] for f in facts} == {"0,255", "255"}
    # 402 masks are palette images read through their palette (their raw indices are inverted).
    assert sum(f["mode"] == "P" for f in facts) == 402 and by_id["ISIC_0024316"]["mode"] == "P"

    result = store.get_json(out.join("results/ham10000_masks.json"))
    assert result["success"] is True and result["statistics"]["evaluated_expectations"] == 8
    report = store.get_bytes(summary["report_uri"]).decode()
    assert "## Lesion masks" in report
    assert "- masks: 10,015 (one row each in `mask_facts.csv`)" in report
    assert "- images without a mask: 0\n" in report
    assert "- file modes: L 9,613, P 402" in report
    assert "- lesion share (pixels at 255 / all pixels): min 0.0039, p1 0.0145" in report
    assert "largest: ISIC_0029819 1.0000, ISIC_0026042 1.0000" in report


def _blurred(mask: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(mask)).convert("L").filter(ImageFilter.GaussianBlur(3)).save(out, "PNG")
    return out.getvalue()


def _resized(mask: bytes, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(mask)).convert("L").resize(size, Image.Resampling.NEAREST).save(out, "PNG")
    return out.getvalue()


def _empty(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 0).save(out, "PNG")
    return out.getvalue()


def test_broken_masks_fail_critically_naming_the_image_id(
    run_stage, pack_sample, sample_masks, bucket, store, tmp_path
):
    ids = list(sample_masks)
    masks = dict(sample_masks)
    masks[ids[0]] = _blurred(masks[ids[0]])  # grey levels between 0 and 255: not binary
    masks[ids[1]] = _resized(masks[ids[1]], (300, 225))  # neither its image's 600x450 nor the original's
    del masks[ids[2]]  # an image without a mask
    masks[ids[3]] = _empty((600, 450))  # binary, but outlines no lesion
    masks[ids[4]] = b"\x89PNG\r\n\x1a\n truncated"  # does not decode
    masks["ISIC_9999998"] = sample_masks[ids[5]]  # a mask of no image
    pack = link_pack(pack_sample, tmp_path / "broken")
    write_masks_zip(pack / MASKS_ARCHIVE, masks)
    dataset_uri = _ingest(run_stage, pack, bucket).summary["dataset_uri"]

    out = bucket.join("runs/badmasks/validation")
    run = _validate(run_stage, dataset_uri, out, check=False)
    assert run.returncode == 2 and run.stdout.strip() == "" and "Traceback" not in run.stderr
    line = run.error_line
    assert line.startswith(f"dermaops validate: error: validation of {dataset_uri} failed 6 critical expectation(s)")
    in_set = "ham10000_masks: expect_column_values_to_be_in_set"
    assert f"{in_set}(has_mask): 1 unexpected of 71, e.g. {ids[2]}=False" in line
    assert f"{in_set}(has_image): 1 unexpected of 71, e.g. ISIC_9999998=False" in line
    assert f"{in_set}(decodes): 1 unexpected of 71, e.g. {ids[4]}=False" in line
    assert f"{in_set}(values): 1 unexpected of 71, e.g. {ids[0]}=" in line
    assert f"{in_set}(size_fit): 1 unexpected of 71, e.g. {ids[1]}=300x225 (image 600x450)" in line
    between = "ham10000_masks: expect_column_values_to_be_between"
    assert f"{between}(lesion_share): 1 unexpected of 71, e.g. {ids[3]}=0.0" in line
    values = line.split(f"{ids[0]}=", 1)[1]
    assert values.split(" ", 1)[0].isdigit() and " levels 0..255" in values  # e.g. "203 levels 0..255"

    report = store.get_bytes(out.join("dq_report.md")).decode()
    assert "**FAILED**: 6 critical expectation(s) not met" in report
    assert f"- images without a mask: 1 ({ids[2]})" in report
    assert "- masks without an image: 1 (ISIC_9999998)" in report
    assert f"failed: 1 ({ids[4]} (" in report
    facts = store.get_bytes(out.join("mask_facts.csv")).decode()
    assert f"{ids[1]},True,True," in facts and ",300,225," in facts


def test_two_masks_of_one_image_fail_the_masks_suite(sample_masks, tmp_path):
    """Ingest refuses a zip with two masks of one image_id; a version stored otherwise still fails."""
    from dermaops.gx_validation import build_suites, outcomes, run_suites

    image_id, mask = next(iter(sample_masks.items()))
    facts = build_mask_facts([(image_id, mask), (image_id, mask)], {image_id: (600, 450)}, workers=1)
    configs = {"mask_facts": json.loads((ROOT / "expectations" / "ham10000_masks.json").read_text())}
    parameters = {"min_lesion_share": 0.001, "max_lesion_share": 1.0}
    results = run_suites(build_suites(configs, ROOT / "expectations"), {"mask_facts": facts}, parameters, tmp_path)
    failed = [o.describe() for o in outcomes(results) if o.critical and not o.success]
    unique = "ham10000_masks: expect_column_values_to_be_unique(image_id)"
    assert failed == [f"{unique}: 2 unexpected of 2, e.g. {image_id}, {image_id}"]


def test_palette_masks_are_read_through_their_palette(pack_200px):
    """402 real masks are palette images whose palette inverts the indices: the lesion is what shows
    white, not index 255."""
    with zipfile.ZipFile(pack_200px / MASKS_ARCHIVE) as zf:
        data = zf.read("ISIC_0024316_segmentation.png")
    with zipfile.ZipFile(pack_200px / "HAM10000_images_part_1.zip") as zf:
        grey = np.asarray(Image.open(io.BytesIO(zf.read("ISIC_0024316.jpg"))).convert("L"), dtype=float)
    raw = Image.open(io.BytesIO(data))
    assert raw.mode == "P"
    lesion = decode_mask(data, Frame("aspect", 600))  # the original's 600x450: no resizing
    assert lesion.shape == (450, 600) and lesion.dtype == bool
    assert np.array_equal(np.asarray(raw) == 255, ~lesion)  # the raw indices are the inverse
    # The lesion is darker than the skin around it, as in most of HAM10000 (the mask at the image's size).
    small = lesion[1::3, 1::3]
    assert 0.01 < small.mean() < 0.99 and grey[small].mean() < grey[~small].mean() - 10
    facts = build_mask_facts([("ISIC_0024316", data)], {"ISIC_0024316": (200, 150)}, workers=1)
    assert facts.loc[0, "lesion_share"] == pytest.approx(lesion.mean(), abs=1e-6)
