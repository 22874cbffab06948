"""The real `ingest` stage, run as a process, from every kind of source, with injected network faults.

Sources are the real packs in ../shared/data: read in place, uploaded to the loopback S3, or served by
the loopback HTTP server of tests/support/http_source.py (plain base URL and Dataverse API layouts).
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest
from dermaops.dataset import ARCHIVES, MASKS_ARCHIVE, METADATA, Dataset
from dermaops.embedded_s3 import free_port
from dermaops.sources import MASKS_NAMES
from dermaops.store import S3Uri

from tests.support.mask_packs import DATAVERSE_MASKS, link_pack, sample_ids, write_masks_zip

FAST_RETRIES = ("--retries", "4", "--retry-base-delay", "0.01", "--retry-max-delay", "0.05")
PART_1, PART_2 = ARCHIVES


def pack_sums(pack: Path) -> dict[str, str]:
    """The pack's own SHA256SUMS: the independent truth the stored bytes must match."""
    sums = {}
    for line in (pack / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    return sums


def expected_version(pack: Path) -> str:
    """The documented rule: 'v' + 16 hex of sha256 over sorted '<name> <sha256>' lines of the
    canonical files (the official CSV already is canonical, byte for byte; the masks zip, when the
    pack has one under either of its names, counts as HAM10000_segmentations_lesion.zip)."""
    sums = pack_sums(pack)
    canonical = {name: sums[name] for name in (METADATA, *ARCHIVES)}
    masks = next((name for name in MASKS_NAMES if name in sums), None)
    if masks:
        canonical[MASKS_ARCHIVE] = sums[masks]
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(canonical.items()))
    return "v" + hashlib.sha256(lines.encode()).hexdigest()[:16]


def snapshot(store, root: S3Uri) -> dict[str, int]:
    return {str(uri): size for uri, size in store.list(root)}


def manifests(store, root: S3Uri) -> list[str]:
    return [uri for uri in snapshot(store, root) if uri.endswith("/manifest.json")]


def ingest(run_stage, source, datasets: S3Uri, *flags: str, check: bool = True):
    return run_stage("ingest", "--source", str(source), "--datasets", str(datasets), *flags, check=check)


def assert_one_line_error(result, *fragments: str, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_published(store, summary: dict, pack: Path) -> dict:
    """The published version holds exactly the pack's bytes (sha256 per file) and reads back; the
    pack's masks zip, under whichever name the source gives it, is stored as MASKS_ARCHIVE."""
    assert summary["dataset_version"] == expected_version(pack)
    manifest = store.get_json(S3Uri.parse(summary["dataset_uri"]).join("manifest.json"))
    assert manifest["dataset_version"] == summary["dataset_version"]
    assert manifest["metadata"] == METADATA and manifest["archives"] == list(ARCHIVES)
    sums = pack_sums(pack)
    stored_as = {name: name for name in (METADATA, *ARCHIVES)}
    masks = next((name for name in MASKS_NAMES if name in sums), None)
    if masks:
        stored_as[masks] = MASKS_ARCHIVE
        assert manifest["masks"] == MASKS_ARCHIVE and summary["masks_source"] == masks
    else:
        assert "masks" not in manifest and summary["n_masks"] == 0 and summary["masks_source"] is None
    for name, stored_name in stored_as.items():
        assert manifest["files"][stored_name]["sha256"] == sums[name], name
        stored = store.get_bytes(S3Uri.parse(summary["dataset_uri"]).join(stored_name))
        assert hashlib.sha256(stored).hexdigest() == sums[name], name
    return manifest


# -- every source kind gives the same, verified dataset version -------------------------------------


def test_local_dir_publishes_the_verified_pack(run_stage, store, bucket, pack_28px, tmp_path):
    result = ingest(run_stage, pack_28px, bucket.join("datasets/ham10000"))
    summary = result.summary
    assert summary["status"] == "done" and summary["source_kind"] == "local"
    assert summary["dataset_uri"] == f"s3://{bucket.bucket}/datasets/ham10000/{summary['dataset_version']}"
    assert (summary["n_rows"], summary["n_images"], summary["n_lesions"]) == (10015, 10015, 7470)
    assert summary["class_counts"] == {
        "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142
    }  # fmt: skip
    assert summary["images_without_metadata"] == 0
    manifest = assert_published(store, summary, pack_28px)
    assert manifest["summary"] == {k: v for k, v in summary.items() if k not in ("stage", "status")}

    dataset = Dataset.open(store, summary["dataset_uri"], tmp_path)
    assert len(dataset.metadata) == 10015
    assert sum(1 for _ in dataset.iter_images()) == 10015


def test_http_base_url(run_stage, store, bucket, http_source, pack_28px):
    url = http_source.base_url("28px")
    result = ingest(run_stage, url, bucket.join("ds"), "--progress-every", "0.000001")
    assert result.summary["source_kind"] == "http"
    assert_published(store, result.summary, pack_28px)
    assert [r.status for r in http_source.logged(f"/plain/28px/{PART_1}") if r.method == "GET"] == [200]
    # Progress lines (bytes, percent, MB/s) while the archive streams, not just one at the end.
    progress = [line for line in result.stderr.splitlines() if f"{PART_1}: " in line and "MB/s" in line]
    assert len(progress) >= 3, result.stderr


def test_http_tab_metadata_is_converted_to_the_canonical_csv(run_stage, store, bucket, http_source, pack_28px):
    result = ingest(run_stage, http_source.base_url("28px", tab=True), bucket.join("ds"))
    assert result.summary["metadata_source"] == "HAM10000_metadata.tab"
    manifest = assert_published(store, result.summary, pack_28px)  # same version as from the CSV
    tab = store.get_bytes(S3Uri.parse(result.summary["dataset_uri"]).join("HAM10000_metadata.tab"))
    assert b'"HAM_0000118"\t"ISIC_0027419"\t"bkl"' in tab  # the Dataverse export itself is kept too
    assert manifest["files"]["HAM10000_metadata.tab"]["sha256"] == hashlib.sha256(tab).hexdigest()


def test_dataverse_dataset_url(run_stage, store, bucket, http_source, pack_28px):
    result = ingest(run_stage, http_source.dataverse_url("28px"), bucket.join("ds"))
    assert result.summary["source_kind"] == "dataverse"
    assert_published(store, result.summary, pack_28px)
    listing = http_source.logged("/api/datasets/:persistentId")
    assert listing and listing[0].path.endswith("persistentId=doi:10.5072/FK2/28PX")
    # The ingested .tab's md5 covers the original upload, so the original CSV is what gets fetched.
    downloads = [r.path for r in http_source.logged("/api/access/datafile/") if r.method == "GET"]
    assert sum(p.endswith("?format=original") for p in downloads) == 1 and len(downloads) == 3


def test_dataverse_doi_with_server_flag_on_the_sample_pack(run_stage, store, bucket, http_source, pack_sample):
    doi = http_source.dataverse_doi("sample")
    result = ingest(run_stage, doi, bucket.join("ds"), "--dataverse-url", http_source.url)
    assert (result.summary["n_rows"], result.summary["n_images"]) == (70, 70)
    assert_published(store, result.summary, pack_sample)


def test_s3_prefix(run_stage, store, bucket, pack_28px):
    source = bucket.join("incoming/ham10000")
    for name in (METADATA, *ARCHIVES):
        store.put_file(source.join(name), pack_28px / name)
    result = ingest(run_stage, source, bucket.join("datasets/ham10000"))
    assert result.summary["source_kind"] == "s3"
    assert_published(store, result.summary, pack_28px)


# -- the optional lesion masks ---------------------------------------------------------------------

# The 28 px pack's dataset version before masks existed (ingest at commit 3e95e73): a source without
# masks must keep it, or every stored version would be orphaned.
VERSION_28PX_WITHOUT_MASKS = "vbc2b5a20af017b88"


def test_a_source_without_masks_keeps_its_dataset_version(store, dataset_28px, tmp_path):
    assert dataset_28px["dataset_version"] == VERSION_28PX_WITHOUT_MASKS
    assert (dataset_28px["n_masks"], dataset_28px["masks_source"]) == (0, None)
    dataset = Dataset.open(store, dataset_28px["dataset_uri"], tmp_path)
    assert "masks" not in dataset.manifest and set(dataset.manifest["files"]) == {METADATA, *ARCHIVES}
    assert dataset.masks_archive is None and list(dataset.iter_masks()) == []


def test_local_200px_pack_stores_the_masks_in_the_version(store, dataset_200px, pack_200px, tmp_path):
    summary = dataset_200px
    assert (summary["n_images"], summary["n_masks"], summary["masks_without_metadata"]) == (10015, 10015, 0)
    manifest = assert_published(store, summary, pack_200px)  # the version hashes the masks zip too
    assert manifest["files"][MASKS_ARCHIVE]["size"] == (pack_200px / MASKS_ARCHIVE).stat().st_size

    dataset = Dataset.open(store, summary["dataset_uri"], tmp_path)
    assert dataset.masks_archive == MASKS_ARCHIVE
    masks = dict(dataset.iter_masks())
    assert set(masks) == set(dataset.metadata["image_id"])
    assert masks["ISIC_0024306"][:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_masks_from_http_and_s3(run_stage, store, bucket, http_source, pack_sample_masks, kind):
    if kind == "http":
        http_source.add_pack("sample-masks", pack_sample_masks)
        source = http_source.base_url("sample-masks")
    else:
        source = bucket.join("incoming/ham10000")
        for name in (METADATA, *ARCHIVES, MASKS_ARCHIVE):
            store.put_file(source.join(name), pack_sample_masks / name)
    summary = ingest(run_stage, source, bucket.join("datasets/ham10000")).summary
    assert summary["source_kind"] == kind and (summary["n_images"], summary["n_masks"]) == (70, 70)
    assert_published(store, summary, pack_sample_masks)
    if kind == "http":
        gets = [r for r in http_source.logged(f"/{MASKS_ARCHIVE}") if r.method == "GET"]
        assert [r.status for r in gets] == [200]


def test_dataverse_masks_under_the_release_name(
    run_stage, store, bucket, http_source, pack_sample_dataverse_masks, tmp_path
):
    """Dataverse ships the masks as HAM10000_segmentations_lesion_tschandl.zip, members in a folder:
    found, md5-verified, stored as HAM10000_segmentations_lesion.zip, the same version as from a folder."""
    http_source.add_pack("dvmasks", pack_sample_dataverse_masks)
    summary = ingest(run_stage, http_source.dataverse_url("dvmasks"), bucket.join("ds")).summary
    assert summary["source_kind"] == "dataverse" and summary["n_masks"] == 70
    assert_published(store, summary, pack_sample_dataverse_masks)
    manifest = store.get_json(S3Uri.parse(summary["dataset_uri"]).join("manifest.json"))
    assert DATAVERSE_MASKS not in manifest["files"]
    downloads = [r.path for r in http_source.logged("/api/access/datafile/") if r.method == "GET"]
    assert len(downloads) == 4  # metadata, two image zips, the masks

    masks = dict(Dataset.open(store, summary["dataset_uri"], tmp_path).iter_masks())
    assert sorted(masks) == sorted(sample_ids(pack_sample_dataverse_masks))
    local = ingest(run_stage, pack_sample_dataverse_masks, bucket.join("ds")).summary
    assert local["dataset_version"] == summary["dataset_version"] and local["status"] == "skipped"


def test_dataverse_masks_are_checksum_verified(run_stage, store, bucket, http_source, pack_sample_dataverse_masks):
    http_source.add_pack("dvmasks", pack_sample_dataverse_masks)
    http_source.corrupt(f"/api/access/datafile/{http_source.dataverse_file_id('dvmasks', DATAVERSE_MASKS)}", 100)
    result = ingest(run_stage, http_source.dataverse_url("dvmasks"), bucket.join("ds"), *FAST_RETRIES, check=False)
    assert_one_line_error(result, f"checksum mismatch for {DATAVERSE_MASKS}", "md5 expected")
    assert snapshot(store, bucket) == {}


def _masks_pack(pack_sample, dest: Path, masks: dict[str, bytes]) -> Path:
    pack = link_pack(pack_sample, dest)
    write_masks_zip(pack / MASKS_ARCHIVE, masks)
    return pack


def test_masks_without_metadata_are_counted_not_fatal(run_stage, store, bucket, pack_sample, sample_masks, tmp_path):
    extra = {**sample_masks, "ISIC_9999999": sample_masks[next(iter(sample_masks))]}
    pack = _masks_pack(pack_sample, tmp_path / "pack", extra)
    result = ingest(run_stage, pack, bucket.join("ds"))
    assert (result.summary["n_masks"], result.summary["masks_without_metadata"]) == (71, 1)
    assert "1 masks have no metadata row (kept), e.g. ISIC_9999999" in result.stderr


def test_two_masks_of_one_image_are_refused(run_stage, store, bucket, pack_sample, sample_masks, tmp_path):
    pack = _masks_pack(pack_sample, tmp_path / "pack", sample_masks)
    image_id = next(iter(sample_masks))
    with zipfile.ZipFile(pack / MASKS_ARCHIVE, "a") as zf:
        zf.writestr(f"again/{image_id}_segmentation.png", sample_masks[image_id])
    result = ingest(run_stage, pack, bucket.join("ds"), check=False)
    assert_one_line_error(
        result,
        f"1 image_ids have more than one mask, e.g. {image_id}: {MASKS_ARCHIVE}:{image_id}_segmentation.png, "
        f"{MASKS_ARCHIVE}:again/{image_id}_segmentation.png",
    )
    assert snapshot(store, bucket) == {}


def test_a_corrupt_masks_zip_fails_and_keeps_what_is_stored(
    run_stage, store, dataset_sample, pack_sample, sample_masks, tmp_path
):
    published = S3Uri.parse(dataset_sample["dataset_uri"])
    datasets = S3Uri(published.bucket, published.key.rsplit("/", 1)[0])
    before = snapshot(store, datasets)
    pack = _masks_pack(pack_sample, tmp_path / "pack", sample_masks)
    with zipfile.ZipFile(pack / MASKS_ARCHIVE) as zf:
        member = zf.infolist()[35]
    # The member is stored uncompressed: byte 40 of its data lies after the 30-byte local header and its name.
    offset = member.header_offset + 30 + len(member.filename) + 40
    data = bytearray((pack / MASKS_ARCHIVE).read_bytes())
    data[offset] ^= 0xFF  # its CRC no longer matches
    (pack / MASKS_ARCHIVE).write_bytes(bytes(data))
    result = ingest(run_stage, pack, datasets, check=False)
    assert_one_line_error(result, f"{MASKS_ARCHIVE} is corrupt", str(pack / MASKS_ARCHIVE))
    assert snapshot(store, datasets) == before


def test_a_masks_zip_without_masks_is_refused(run_stage, store, bucket, pack_sample, tmp_path):
    pack = link_pack(pack_sample, tmp_path / "pack")
    with zipfile.ZipFile(pack / MASKS_ARCHIVE, "w") as zf:
        zf.writestr("ISIC_0024306.png", b"not a mask name")
    result = ingest(run_stage, pack, bucket.join("ds"), check=False)
    assert_one_line_error(result, f"{MASKS_ARCHIVE} holds no lesion mask")
    assert snapshot(store, bucket) == {}


# -- idempotency -----------------------------------------------------------------------------------


def test_rerun_skips_and_force_reingests(run_stage, store, bucket, http_source, pack_28px):
    datasets = bucket.join("datasets/ham10000")
    first = ingest(run_stage, http_source.base_url("28px"), datasets).summary
    assert first["status"] == "done"
    manifest_uri = S3Uri.parse(first["dataset_uri"]).join("manifest.json")
    created = store.get_json(manifest_uri)["created_at"]

    # Unchanged source (same ETags): skipped from the recorded source fingerprint, no archive downloaded.
    http_source.requests.clear()
    rerun = ingest(run_stage, http_source.base_url("28px"), datasets)
    again = rerun.summary
    assert again["status"] == "skipped" and again["dataset_version"] == first["dataset_version"]
    assert not [r for r in http_source.requests if r.method == "GET" and r.path.endswith(".zip")]
    # The log names the source as the user gave it (it read "source http:http://..." before).
    assert f"source {http_source.base_url('28px')} unchanged since" in rerun.stderr
    assert "http:http" not in rerun.stderr

    # Another source with the same content: downloaded, found already published, skipped.
    other = ingest(run_stage, pack_28px, datasets).summary
    assert other["status"] == "skipped" and other["dataset_uri"] == first["dataset_uri"]
    assert store.get_json(manifest_uri)["created_at"] == created

    # --force fetches and publishes again, to the same content-derived place.
    http_source.requests.clear()
    forced = ingest(run_stage, http_source.base_url("28px"), datasets, "--force").summary
    assert forced["status"] == "done" and forced["dataset_uri"] == first["dataset_uri"]
    assert [r.path for r in http_source.requests if r.method == "GET" and r.path.endswith(".zip")]
    assert_published(store, forced, pack_28px)
    assert manifests(store, datasets) == [str(manifest_uri)]


# -- transient faults: retried, resumed ------------------------------------------------------------


def test_retries_through_503s(run_stage, store, bucket, http_source, pack_28px):
    http_source.fail(PART_1, times=3)
    result = ingest(run_stage, http_source.base_url("28px"), bucket.join("ds"), *FAST_RETRIES)
    assert_published(store, result.summary, pack_28px)
    assert [r.status for r in http_source.logged(PART_1)] == [503, 503, 503, 200, 200]  # HEAD tries, then GET
    assert "HTTP 503" in result.stderr


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_resumes_with_a_range_request(run_stage, store, bucket, http_source, pack_28px, fault):
    cut = 1_500_000
    getattr(http_source, fault)(PART_2, after_bytes=cut)
    result = ingest(run_stage, http_source.base_url("28px"), bucket.join("ds"), *FAST_RETRIES)
    gets = [r for r in http_source.logged(PART_2) if r.method == "GET"]
    assert [r.status for r in gets] == [200, 206] and "Range" not in gets[0].headers
    # Resumed from what had arrived intact (a chunk in flight when the connection broke is lost).
    resumed_at = int(gets[1].headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut
    assert gets[1].headers.get("If-Range")  # the resume is conditional on the file being unchanged
    manifest = assert_published(store, result.summary, pack_28px)  # the stitched file has the right sha256
    assert manifest["files"][PART_2]["size"] == (pack_28px / PART_2).stat().st_size


def test_restarts_when_the_server_ignores_ranges(run_stage, store, bucket, http_source, pack_28px):
    http_source.ranges = False
    http_source.truncate(PART_1, after_bytes=2_000_000)
    result = ingest(run_stage, http_source.base_url("28px"), bucket.join("ds"), *FAST_RETRIES)
    gets = [r for r in http_source.logged(PART_1) if r.method == "GET"]
    assert [r.status for r in gets] == [200, 200] and gets[1].headers.get("Range", "").startswith("bytes=")
    assert "restarting from byte 0" in result.stderr
    assert_published(store, result.summary, pack_28px)


def test_unreachable_host_is_transient_after_retries(run_stage, bucket):
    url = f"http://127.0.0.1:{free_port()}/ham10000"
    result = ingest(run_stage, url, bucket.join("ds"), *FAST_RETRIES, check=False)
    assert_one_line_error(result, "giving up on", url, "after 5 attempts", code=3)


# -- integrity failures: one line, nothing published -----------------------------------------------


def test_corrupted_zip_fails_and_publishes_nothing(run_stage, store, bucket, http_source, pack_28px):
    datasets = bucket.join("datasets/ham10000")
    ingest(run_stage, pack_28px, datasets)  # an existing dataset version must survive untouched
    before = snapshot(store, bucket)
    http_source.corrupt(PART_2, offset=(pack_28px / PART_2).stat().st_size // 2)
    result = ingest(run_stage, http_source.base_url("28px"), bucket.join("other"), check=False)
    assert_one_line_error(result, f"{PART_2} is corrupt")
    assert snapshot(store, bucket) == before


def test_dataverse_checksum_mismatch_is_retried_then_fails(run_stage, store, bucket, http_source):
    http_source.corrupt("/api/access/datafile/", offset=100)  # every download of every file
    result = ingest(run_stage, http_source.dataverse_url("sample"), bucket.join("ds"), *FAST_RETRIES, check=False)
    assert_one_line_error(result, "checksum mismatch for", "md5 expected")
    assert len([r for r in http_source.logged("/api/access/datafile/") if r.method == "GET"]) == 5
    assert snapshot(store, bucket) == {}


def test_404_names_the_url(run_stage, bucket, http_source, pack_28px, tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    for name in (METADATA, PART_1):
        shutil.copy(pack_28px / name, pack / name)
    http_source.add_pack("partial", pack)
    result = ingest(run_stage, http_source.base_url("partial"), bucket.join("ds"), check=False)
    assert_one_line_error(result, "HTTP 404", f"{http_source.base_url('partial')}/{PART_2}")


def test_unknown_dataverse_dataset_names_the_doi(run_stage, bucket, http_source):
    source = f"{http_source.url}/dataset.xhtml?persistentId=doi:10.5072/FK2/NOPE"
    result = ingest(run_stage, source, bucket.join("ds"), check=False)
    assert_one_line_error(result, "doi:10.5072/FK2/NOPE not found (HTTP 404)")


def copy_pack(pack: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (METADATA, *ARCHIVES):
        shutil.copy(pack / name, dest / name)
    return dest


def rewrite_metadata(pack: Path, edit) -> None:
    rows = list(csv.reader(io.StringIO((pack / METADATA).read_text())))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(edit(rows))
    (pack / METADATA).write_text(buf.getvalue())


def test_missing_columns_are_named(run_stage, store, bucket, pack_28px, tmp_path):
    pack = copy_pack(pack_28px, tmp_path / "pack")
    rewrite_metadata(pack, lambda rows: [[v for i, v in enumerate(r) if i not in (2, 6)] for r in rows])
    result = ingest(run_stage, pack, bucket.join("ds"), check=False)
    assert_one_line_error(result, "HAM10000_metadata.csv lacks required columns ['dx', 'localization']")
    assert snapshot(store, bucket) == {}


def test_metadata_ids_without_images_give_count_and_first_ids(run_stage, store, bucket, pack_28px, tmp_path):
    pack = copy_pack(pack_28px, tmp_path / "pack")
    ghosts = [f"ISIC_99{i:05d}" for i in range(7)]
    rewrite_metadata(
        pack, lambda rows: rows + [["HAM_9999999", g, "nv", "histo", "50.0", "male", "back"] for g in ghosts]
    )
    result = ingest(run_stage, pack, bucket.join("ds"), check=False)
    assert_one_line_error(result, "7 metadata image_ids have no image", ", ".join(ghosts[:5]) + " ...")
    assert ghosts[5] not in result.error_line
    assert snapshot(store, bucket) == {}


def test_duplicate_images_are_refused(run_stage, bucket, pack_28px, tmp_path):
    pack = copy_pack(pack_28px, tmp_path / "pack")
    with zipfile.ZipFile(pack / PART_1) as zf:
        first = zf.infolist()[0]
        data = zf.read(first)
    with zipfile.ZipFile(pack / PART_2, "a") as zf:
        zf.writestr(first.filename, data)
    result = ingest(run_stage, pack, bucket.join("ds"), check=False)
    image_id = first.filename.rsplit(".", 1)[0]
    assert_one_line_error(result, "1 image_ids have more than one image", f"{image_id}: {PART_1}:", f"{PART_2}:")


def test_images_without_metadata_are_reported_not_fatal(run_stage, bucket, pack_28px, tmp_path):
    pack = copy_pack(pack_28px, tmp_path / "pack")
    rewrite_metadata(pack, lambda rows: rows[:-1])
    result = ingest(run_stage, pack, bucket.join("ds"))
    assert (result.summary["n_rows"], result.summary["images_without_metadata"]) == (10014, 1)
    assert "1 images have no metadata row" in result.stderr


# -- bad flags and URIs: one line, exit 2, existing artifacts untouched ---------------------------


@pytest.mark.parametrize(
    ("source", "datasets", "flags", "fragments"),
    [
        ("ftp://example.org/ham", None, (), ("unsupported --source 'ftp://example.org/ham'",)),
        ("/nonexistent/ham10000", None, (), ("--source directory does not exist: /nonexistent/ham10000",)),
        (None, "/tmp/datasets", (), ("not an S3 URI: '/tmp/datasets'",)),
        (None, "s3://no-such-bucket-dermaops/datasets", (), ("bucket does not exist: s3://no-such-bucket-dermaops",)),
        (None, None, ("--retries", "-1"), ("--retries must be 0..100, got -1",)),
        ("doi:10.7910/DVN/DBW86T", None, ("--dataverse-url", "ftp://dv"), ("--dataverse-url must be an http(s)",)),
    ],
)
def test_bad_flags_fail_in_one_line_and_touch_nothing(
    run_stage, store, dataset_28px, pack_28px, source, datasets, flags, fragments
):
    published = S3Uri.parse(dataset_28px["dataset_uri"])
    good = S3Uri(published.bucket, published.key.rsplit("/", 1)[0])
    before = snapshot(store, good)
    manifest = store.get_bytes(published.join("manifest.json"))
    result = ingest(run_stage, source or pack_28px, datasets or good, *flags, check=False)
    assert_one_line_error(result, *fragments)
    assert snapshot(store, good) == before
    assert store.get_bytes(published.join("manifest.json")) == manifest


def test_credentials_in_the_source_url_never_reach_the_summary(run_stage, bucket, http_source):
    url = http_source.base_url("28px").replace("http://", "http://reader:s3cret@")
    result = ingest(run_stage, url, bucket.join("ds"))
    assert "s3cret" not in result.stdout and "s3cret" not in result.stderr
    assert result.summary["source"].startswith("http://***@127.0.0.1:")
