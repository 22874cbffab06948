"""The stage contract shared by every stage (docs/architecture.md, "The stage contract").

- Outputs live under one S3 prefix. Files are written first; `manifest.json` is written LAST and is
  the only proof that the outputs are finished. Readers trust nothing without it.
- A stage whose output prefix already holds a manifest with the same input fingerprint skips and
  reports `{"status": "skipped", ...}` with the summary it published before, unless forced.
- Re-running with different inputs (or `--force`) first removes the old manifest, so a crash
  half-way through never leaves stale files that look finished.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermaops import __version__
from dermaops.errors import StageError
from dermaops.store import ArtifactStore, S3Uri, sha256_bytes, sha256_file

MANIFEST = "manifest.json"
log = logging.getLogger("dermaops")


def fingerprint(**inputs: Any) -> str:
    """A stable hash of everything that determines a stage's outputs (input URIs, their manifests'
    fingerprints, parameters). Same inputs, same fingerprint, so the stage can skip."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_manifest(store: ArtifactStore, prefix: str | S3Uri, what: str = "stage output") -> dict:
    """The manifest of a finished output, or a one-line error saying which output is unfinished."""
    prefix = prefix if isinstance(prefix, S3Uri) else S3Uri.parse(prefix)
    uri = prefix.join(MANIFEST)
    if not store.exists(uri):
        raise StageError(f"no finished {what} at {prefix}: {MANIFEST} is missing (did the producing stage finish?)")
    return store.get_json(uri)


@dataclass
class Output:
    """A stage's output prefix, written file by file and published with a manifest at the end."""

    store: ArtifactStore
    prefix: S3Uri
    stage: str
    fingerprint: str
    files: dict[str, dict] = field(default_factory=dict)

    def uri(self, name: str) -> S3Uri:
        return self.prefix.join(name)

    def finished(self) -> dict | None:
        """The published manifest if it is for the same inputs, else None."""
        uri = self.uri(MANIFEST)
        if not self.store.exists(uri):
            return None
        manifest = self.store.get_json(uri)
        return manifest if manifest.get("fingerprint") == self.fingerprint else None

    def unpublish(self) -> None:
        """Withdraw an earlier manifest before overwriting, so readers never see a mix."""
        uri = self.uri(MANIFEST)
        if self.store.exists(uri):
            self.store.delete(uri)

    def put_bytes(self, name: str, data: bytes, content_type: str | None = None) -> S3Uri:
        uri = self.store.put_bytes(self.uri(name), data, content_type)
        self.files[name] = {"sha256": sha256_bytes(data), "size": len(data)}
        return uri

    def put_json(self, name: str, obj: Any) -> S3Uri:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.put_bytes(name, data, "application/json")

    def put_text(self, name: str, text: str, content_type: str = "text/plain; charset=utf-8") -> S3Uri:
        return self.put_bytes(name, text.encode(), content_type)

    def put_file(self, name: str, path: Path, sha256: str | None = None, content_type: str | None = None) -> S3Uri:
        uri = self.store.put_file(self.uri(name), path, content_type)
        self.files[name] = {"sha256": sha256 or sha256_file(path), "size": path.stat().st_size}
        return uri

    def publish(self, summary: dict, **extra: Any) -> dict:
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "created_at": utcnow(),
            "dermaops_version": __version__,
            "files": self.files,
            "summary": summary,
            **extra,
        }
        self.store.put_json(self.uri(MANIFEST), manifest)
        return manifest


def skipped(manifest: dict) -> dict:
    return {**manifest.get("summary", {}), "status": "skipped"}


@dataclass
class Context:
    """What every stage gets: the artifact store and a private local scratch directory."""

    store: ArtifactStore
    scratch: Path

    def output(self, prefix: str | S3Uri, stage: str, fp: str) -> Output:
        prefix = prefix if isinstance(prefix, S3Uri) else S3Uri.parse(prefix)
        return Output(self.store, prefix, stage, fp)


class scratch_dir:
    """A scratch directory: DERMAOPS_SCRATCH_DIR (kept, for inspection and download caches) or a
    temporary one removed at exit."""

    def __init__(self, explicit: str | None = None):
        self.explicit = explicit or os.environ.get("DERMAOPS_SCRATCH_DIR")
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        if self.explicit:
            path = Path(self.explicit)
            path.mkdir(parents=True, exist_ok=True)
            return path
        self._tmp = tempfile.mkdtemp(prefix="dermaops-")
        return Path(self._tmp)

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
