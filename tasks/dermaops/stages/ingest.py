"""Fetch the HAM10000 release, verify it and store it as an immutable, content-addressed dataset version.

Sources: an http(s) base URL, a Harvard Dataverse dataset (default, doi:10.7910/DVN/DBW86T), an
s3:// prefix or a local directory, each holding HAM10000_metadata.csv (or Dataverse's .tab) and
HAM10000_images_part_1.zip / _part_2.zip, and optionally the lesion masks
HAM10000_segmentations_lesion.zip (Dataverse: HAM10000_segmentations_lesion_tschandl.zip). Downloads
stream to scratch, are retried with exponential backoff and resumed with HTTP ranges. Checks: every zip
passes its CRC test, the metadata has the required columns, every metadata image_id has exactly one
image, no image_id has two masks. The dataset version is derived from the content, so the same data
lands in the same place and a re-run skips; the masks are content too, and a source without them
gives the version it gave before masks existed.

Output: <datasets>/<dataset_version>/{HAM10000_metadata.csv, HAM10000_images_part_*.zip,
[HAM10000_segmentations_lesion.zip,] manifest.json}; the manifest's `masks` names the masks zip when
there is one (whether the masks are well-formed is the validate stage's to judge).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import shutil
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from dermaops.archives import check_archive
from dermaops.config import IngestConfig
from dermaops.dataset import MASKS_ARCHIVE, METADATA, REQUIRED_COLUMNS, image_id_of, mask_image_id_of
from dermaops.errors import StageError, TransientError
from dermaops.redaction import redact
from dermaops.sources import (
    DEFAULT_DATAVERSE_URL,
    HAM10000_DOI,
    MASKS_NAMES,
    TOKEN_ENV,
    Source,
    SourceCredentials,
    open_source,
)
from dermaops.sources.transfer import Fetched, TransferSettings
from dermaops.stage import Context, StageIO, fingerprint, skipped, utcnow
from dermaops.store import S3Uri, sha256_file

HELP = "fetch and verify HAM10000, store an immutable dataset version"
CONFIG = IngestConfig  # how it talks to the source: retries, backoff, timeouts, the Dataverse server
DEFAULT_SOURCE = f"{DEFAULT_DATAVERSE_URL}/dataset.xhtml?persistentId={HAM10000_DOI}"
SOURCES_DIR = "_sources"  # source fingerprints, next to the versions: <datasets>/_sources/<key>.json
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help="http(s) base URL, Dataverse dataset URL or doi:..., s3://bucket/prefix, or a local directory; a token "
        f"or password goes in ${TOKEN_ENV} (see dermaops.sources), not in the URL",
    )
    parser.add_argument(
        "--datasets", required=True, help="S3 prefix of the dataset versions, e.g. s3://<bucket>/datasets/ham10000"
    )


@dataclass
class Metadata:
    name: str
    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        i = self.header.index(name)
        return [row[i] for row in self.rows]

    def canonical_csv(self) -> bytes:
        """The metadata as plain CSV (comma, minimal quoting, LF). The official CSV already is exactly
        this, byte for byte, so a .csv and a .tab of the same table give the same dataset version."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buf.getvalue().encode()


def run(stage_io: StageIO, cfg: IngestConfig, ctx: Context) -> dict:
    started = time.monotonic()
    datasets = S3Uri.parse(stage_io.inputs["datasets"])
    settings = TransferSettings(
        retries=cfg.retries,
        base_delay=cfg.retry_base_delay,
        max_delay=cfg.retry_max_delay,
        timeout=cfg.timeout,
        progress_every=cfg.progress_every,
    )
    source = open_source(stage_io.inputs["source"], settings, cfg.dataverse_url, SourceCredentials.from_env())
    next(ctx.store.list(datasets), None)  # fail on a missing bucket now, not after downloading gigabytes

    files = source.files()
    source_fp = source.fingerprint(files)
    if source_fp is not None and not stage_io.force:
        unchanged = _unchanged_source(ctx, datasets, source, source_fp)
        if unchanged is not None:
            return unchanged

    workdir = ctx.scratch / "ingest" / source.key
    try:
        fetched = [source.fetch(f, workdir) for f in files]
        metadata = read_metadata(fetched[0])
        masks = next((f for f in fetched if f.name in MASKS_NAMES), None)
        archives = [f for f in fetched[1:] if f is not masks]
        images = index_archives(archives)
        extras = check_images(metadata, images, archives)
        if masks is None:
            log.info("no lesion masks in the source (the optional %s); ingesting without them", MASKS_ARCHIVE)
        mask_index = index_archives([masks], mask_image_id_of) if masks else {}
        masks_without_metadata = check_masks(metadata, mask_index, masks) if masks else []
    except TransientError:
        raise  # keep partial downloads: the next attempt resumes them
    except StageError:
        shutil.rmtree(workdir, ignore_errors=True)  # bad bytes must not be resumed into the next attempt
        raise

    canonical_path = workdir / "canonical" / METADATA
    canonical_path.parent.mkdir(parents=True, exist_ok=True)
    canonical_path.write_bytes(metadata.canonical_csv())
    canonical = {METADATA: sha256_file(canonical_path), **{a.name: a.sha256 for a in archives}}
    if masks:
        canonical[MASKS_ARCHIVE] = masks.sha256  # absent without masks: the version stays what it was
    version = dataset_version(canonical)
    out = ctx.output(datasets.join(version), "ingest", fingerprint(dataset_version=version))

    finished = out.finished()
    if finished and not stage_io.force:
        log.info("dataset version %s is already published at %s; skipping", version, out.prefix)
        _record_source(ctx, datasets, source, source_fp, version, out.fingerprint)
        shutil.rmtree(workdir, ignore_errors=True)
        return _skip(finished)

    if not finished:
        # A manifest of another kind at this prefix: withdraw it while the files are rewritten. One for the same
        # version that a concurrent ingest published since the check above stays: the version is the hash of
        # the bytes both write.
        out.unpublish(keep_same_inputs=True)
    # Forcing over a finished version rewrites identical bytes (the version is their hash), so its
    # manifest stays up and concurrent readers never see the version disappear.
    for archive in archives:
        log.info("storing %s (%.1f MB)", archive.name, archive.size / 1e6)
        out.put_file(archive.name, archive.path, sha256=archive.sha256, content_type="application/zip")
    if masks:
        log.info("storing %s as %s (%.1f MB)", masks.name, MASKS_ARCHIVE, masks.size / 1e6)
        out.put_file(MASKS_ARCHIVE, masks.path, sha256=masks.sha256, content_type="application/zip")
    if fetched[0].name != METADATA:
        # Keep the source's own metadata file too (e.g. Dataverse's .tab), next to the canonical CSV.
        out.put_file(fetched[0].name, fetched[0].path, sha256=fetched[0].sha256)
    out.put_file(METADATA, canonical_path, sha256=canonical[METADATA], content_type="text/csv")

    dx = Counter(metadata.column("dx"))
    summary = {
        "dataset_uri": str(out.prefix),
        "dataset_version": version,
        "n_images": len(images),
        "n_rows": len(metadata.rows),
        "n_lesions": len(set(metadata.column("lesion_id"))),
        "class_counts": dict(sorted(dx.items())),
        "images_without_metadata": len(extras),
        "n_masks": len(mask_index),
        "masks_without_metadata": len(masks_without_metadata),
        "masks_source": masks.name if masks else None,
        "source": redact(stage_io.inputs["source"]),
        "source_kind": source.kind,
        "metadata_source": fetched[0].name,
        "bytes": sum(f.size for f in fetched),
        "seconds": round(time.monotonic() - started, 2),
    }
    out.publish(
        summary,
        dataset_version=version,
        metadata=METADATA,
        archives=[a.name for a in archives],
        **({"masks": MASKS_ARCHIVE} if masks else {}),
    )
    log.info("published dataset version %s at %s", version, out.prefix)
    _record_source(ctx, datasets, source, source_fp, version, out.fingerprint)
    shutil.rmtree(workdir, ignore_errors=True)
    return summary


def dataset_version(canonical: dict[str, str]) -> str:
    """'v' + 16 hex of sha256 over the sorted `name sha256` lines of the canonical files."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(canonical.items()))
    return "v" + hashlib.sha256(lines.encode()).hexdigest()[:16]


def read_metadata(fetched: Fetched) -> Metadata:
    """Parse the metadata (.csv, or Dataverse's tab-separated .tab with double-quoted strings)."""
    delimiter = "\t" if fetched.name.lower().endswith(".tab") else ","
    try:
        text = fetched.path.read_text(encoding="utf-8-sig")
        rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row]
    except UnicodeDecodeError as exc:
        raise StageError(f"{fetched.name} is not UTF-8 text ({fetched.location})") from exc
    except csv.Error as exc:
        raise StageError(f"{fetched.name} is not readable as delimited text: {exc} ({fetched.location})") from exc
    if not rows:
        raise StageError(f"{fetched.name} is empty ({fetched.location})")
    header, body = rows[0], rows[1:]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise StageError(f"{fetched.name} lacks required columns {missing} (has {header})")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise StageError(f"{fetched.name} row {line} has {len(row)} fields, the header has {len(header)}")
    return Metadata(fetched.name, header, body)


def index_archives(archives: list[Fetched], id_of: Callable[[str], str | None] = image_id_of) -> dict[str, list[str]]:
    """image_id -> ["<archive>:<member>", ...] over all archives, after a full CRC test of each.
    `id_of` maps a member name to its image_id (None: not an image, or not a mask)."""
    images: dict[str, list[str]] = defaultdict(list)
    for archive in archives:
        started = time.monotonic()
        try:
            zf = zipfile.ZipFile(archive.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise StageError(f"{archive.name} is not a zip archive ({archive.location})") from exc
        with zf:
            # Declared sizes and ratios first: a bomb is refused before a byte of it is decompressed.
            check_archive(zf, f"{archive.name} ({redact(archive.location)})", archive.size)
            try:
                bad = zf.testzip()
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise StageError(f"{archive.name} is corrupt: {exc} ({archive.location})") from exc
            if bad is not None:
                raise StageError(f"{archive.name} is corrupt: member {bad} fails its CRC check ({archive.location})")
            for info in zf.infolist():
                image_id = None if info.is_dir() else id_of(info.filename)
                if image_id is not None:
                    images[image_id].append(f"{archive.name}:{info.filename}")
        log.info("%s: CRC test passed in %.1f s", archive.name, time.monotonic() - started)
    return dict(images)


def _refuse_duplicates(index: dict[str, list[str]], what: str) -> None:
    duplicated = {image_id: where for image_id, where in index.items() if len(where) > 1}
    if duplicated:
        image_id, where = sorted(duplicated.items())[0]
        raise StageError(f"{len(duplicated)} image_ids have more than one {what}, e.g. {image_id}: {', '.join(where)}")


def check_images(metadata: Metadata, images: dict[str, list[str]], archives: list[Fetched]) -> list[str]:
    """Every metadata image_id has exactly one image; returns image_ids that have no metadata row."""
    _refuse_duplicates(images, "image")
    ids = list(dict.fromkeys(metadata.column("image_id")))
    missing = [image_id for image_id in ids if image_id not in images]
    if missing:
        raise StageError(
            f"{len(missing)} metadata image_ids have no image in {', '.join(a.name for a in archives)}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    extras = sorted(set(images) - set(ids))
    if extras:
        log.warning("%d images have no metadata row (kept, not used), e.g. %s", len(extras), ", ".join(extras[:5]))
    return extras


def check_masks(metadata: Metadata, masks: dict[str, list[str]], archive: Fetched) -> list[str]:
    """At most one mask per image_id, and at least one mask in the zip; returns the image_ids of masks
    without a metadata row (counted, kept). Whether every image has a well-formed mask is validate's
    to judge: it decodes them all, which ingest does not."""
    if not masks:
        raise StageError(
            f"{archive.name} holds no lesion mask (no member named ISIC_<id>_segmentation.png) ({archive.location})"
        )
    _refuse_duplicates(masks, "mask")
    extras = sorted(set(masks) - set(metadata.column("image_id")))
    if extras:
        log.warning("%d masks have no metadata row (kept), e.g. %s", len(extras), ", ".join(extras[:5]))
    log.info("%s: %d lesion masks", archive.name, len(masks))
    return extras


def _source_record_uri(datasets: S3Uri, source: Source) -> S3Uri:
    return datasets.join(SOURCES_DIR, f"{source.key}.json")


def _unchanged_source(ctx: Context, datasets: S3Uri, source: Source, source_fp: dict) -> dict | None:
    """The published dataset this exact source state was ingested into before, if still there."""
    uri = _source_record_uri(datasets, source)
    if not ctx.store.exists(uri):
        return None
    record = ctx.store.get_json(uri)
    if record.get("fingerprint") != source_fp:
        log.info("source %s changed since %s; fetching", source.location, record.get("recorded_at"))
        return None
    out = ctx.output(datasets.join(record["dataset_version"]), "ingest", record["output_fingerprint"])
    finished = out.finished()
    if finished is None:
        return None
    log.info(
        "source %s unchanged since %s (dataset version %s); skipping without downloading",
        source.location,
        record.get("recorded_at"),
        record["dataset_version"],
    )
    return _skip(finished)


def _skip(manifest: dict) -> dict:
    # The stored summary's "seconds" timed the ingest that published it; cli.py times this run instead.
    summary = skipped(manifest)
    summary.pop("seconds", None)
    return summary


def _record_source(
    ctx: Context, datasets: S3Uri, source: Source, source_fp: dict | None, version: str, output_fp: str
) -> None:
    if source_fp is None:
        return
    record = {
        "source": source.identity,
        "fingerprint": source_fp,
        "dataset_version": version,
        "output_fingerprint": output_fp,
        "recorded_at": utcnow(),
    }
    ctx.store.put_json(_source_record_uri(datasets, source), record)
