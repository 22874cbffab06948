"""Put a HAM10000 data pack into a deployment's S3, where ingest reads it: `scripts/stack seed` runs this.

    python -m dermaops.seed PACK_DIR s3://<bucket>/sources/<name>

A pack is a folder in the official layout (the one `ingest` reads): HAM10000_metadata.csv, the two image
zips, optionally HAM10000_segmentations_lesion.zip and other files (SHA256SUMS, dermamnist_splits.csv),
all copied as they are. The folder is checked before anything is written (one line naming what is
missing); each object is checked after the upload (its size). The S3 endpoint and key come from the
environment as for every stage (DERMAOPS_S3_ENDPOINT_URL, AWS_*). The last stdout line is the source
URI to ingest; a count of what went up goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dermaops.errors import StageError
from dermaops.store import ArtifactStore, S3Uri

REQUIRED = ("HAM10000_metadata.csv", "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")


def pack_files(pack: Path) -> list[Path]:
    """The pack's files, once the folder is known to hold the official layout."""
    if not pack.is_dir():
        raise StageError(f"{pack} is not a folder (a data pack: {', '.join(REQUIRED)})")
    missing = [name for name in REQUIRED if not (pack / name).is_file()]
    if missing:
        raise StageError(f"{pack} is not a HAM10000 data pack: it lacks {', '.join(missing)}")
    return sorted(p for p in pack.iterdir() if p.is_file())


def seed(pack: Path, dest: S3Uri, store: ArtifactStore) -> tuple[int, int]:
    """Upload the pack's files under `dest`; (files, bytes)."""
    files = pack_files(pack)
    total = 0
    for path in files:
        uri = dest.join(path.name)
        store.put_file(uri, path)
        size = path.stat().st_size
        if store.size(uri) != size:
            raise StageError(f"{uri} holds {store.size(uri)} bytes after the upload, {path} has {size}")
        total += size
    return len(files), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermaops.seed", description=__doc__.splitlines()[0])
    parser.add_argument("pack", type=Path, help="the data pack's folder")
    parser.add_argument("dest", help="where to put it: s3://<bucket>/<prefix>")
    args = parser.parse_args(argv)
    try:
        dest = S3Uri.parse(args.dest)
        files, size = seed(args.pack.resolve(), dest, ArtifactStore())
    except StageError as exc:
        print(f"seed: error: {exc}", file=sys.stderr)
        return 2
    print(f"seed: {files} files of {args.pack.resolve()} ({size / 1e6:.1f} MB) uploaded to {dest}", file=sys.stderr)
    print(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
