"""The stage contract shared by every stage (docs/architecture.md, "The stage contract").

- Outputs live under one S3 prefix. Files are written first; `manifest.json` is written LAST and is
  the only proof that the outputs are finished. Readers trust nothing without it.
- A stage whose output prefix already holds a manifest with the same input fingerprint skips and
  reports `{"status": "skipped", ...}` with the summary it published before, unless forced.
- Re-running with different inputs (or `--force`) first removes the old manifest, so a crash
  half-way through never leaves stale files that look finished.
- Readers verify what they load: `read_verified` / `download_verified` check each file's sha256
  against the manifest they trusted, so a file rewritten after publication fails with one line
  instead of being used as if it were the published one.
- One writer per prefix: the first write claims the prefix (`_writer.json`: inputs' fingerprint and a
  unique owner token). A writer for OTHER inputs takes the claim over when it starts, and from then
  on every write of the earlier one, its publish included, fails with one line, so two runs never
  mix their files under one manifest. Writers with the same fingerprint (a retry, or train and
  train_baseline building the same image cache) make the same outputs and share the claim. After
  publishing, the manifest is read back: it must be for this writer's inputs.
- Every stage's entry point is `run(io: StageIO, cfg, ctx: Context) -> dict`: where it reads and writes
  and how it was asked to run (`StageIO`), its checked settings (its `CONFIG`, or None), and the store
  and scratch space (`Context`). No stage sees the parsed command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dermaops import __version__
from dermaops.errors import StageError
from dermaops.store import ArtifactStore, S3Uri, sha256_bytes, sha256_file

MANIFEST = "manifest.json"
CLAIM = "_writer.json"
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


def _manifest_entry(manifest: dict, prefix: S3Uri, name: str) -> dict:
    entry = manifest.get("files", {}).get(name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        listed = sorted(manifest.get("files", {}))
        raise StageError(f"{prefix.join(MANIFEST)} lists no sha256 for {name} (files: {listed})")
    return entry


def _mismatch(uri: S3Uri, prefix: S3Uri, expected: str, actual: str) -> StageError:
    return StageError(
        f"checksum mismatch for {uri}: sha256 {actual[:16]} differs from {prefix.join(MANIFEST)}'s {expected[:16]} "
        "(rewritten after it was published, e.g. by another run writing to the same prefix); not using it"
    )


def read_verified(store: ArtifactStore, prefix: str | S3Uri, name: str, manifest: dict | None = None) -> bytes:
    """A published file's bytes, checked against the sha256 its manifest (given, or read now) records."""
    prefix = prefix if isinstance(prefix, S3Uri) else S3Uri.parse(prefix)
    manifest = read_manifest(store, prefix) if manifest is None else manifest
    expected = _manifest_entry(manifest, prefix, name)["sha256"]
    data = store.get_bytes(prefix.join(name))
    if (actual := sha256_bytes(data)) != expected:
        raise _mismatch(prefix.join(name), prefix, expected, actual)
    return data


def download_verified(
    store: ArtifactStore, prefix: str | S3Uri, name: str, path: Path, manifest: dict | None = None
) -> Path:
    """A published file downloaded to `path` and checked like `read_verified` (a mismatch leaves no file)."""
    prefix = prefix if isinstance(prefix, S3Uri) else S3Uri.parse(prefix)
    manifest = read_manifest(store, prefix) if manifest is None else manifest
    expected = _manifest_entry(manifest, prefix, name)["sha256"]
    store.download(prefix.join(name), path)
    if (actual := sha256_file(path)) != expected:
        path.unlink(missing_ok=True)
        raise _mismatch(prefix.join(name), prefix, expected, actual)
    return path


@dataclass
class Output:
    """A stage's output prefix, written file by file and published with a manifest at the end."""

    store: ArtifactStore
    prefix: S3Uri
    stage: str
    fingerprint: str
    files: dict[str, dict] = field(default_factory=dict)
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _claimed: bool = False

    def uri(self, name: str) -> S3Uri:
        return self.prefix.join(name)

    def _claim(self) -> None:
        """Before any write: claim the prefix on the first one, check the claim is still ours on the next."""
        uri = self.uri(CLAIM)
        current = self.store.get_json_or_none(uri)
        if isinstance(current, dict) and current.get("fingerprint") == self.fingerprint:
            self._claimed = True
            return
        if self._claimed:
            who = current or {}
            raise StageError(
                f"another {who.get('stage', 'stage')} run for other inputs (host {who.get('host')}, pid "
                f"{who.get('pid')}, since {who.get('claimed_at')}) took over {self.prefix} while this one was "
                "writing it; this run publishes nothing (use a separate output prefix per run)"
            )
        if current is not None:
            log.warning(
                "%s was last claimed by a %s run for other inputs (since %s); taking it over",
                self.prefix, current.get("stage") if isinstance(current, dict) else "?",
                current.get("claimed_at") if isinstance(current, dict) else "?",
            )  # fmt: skip
        claim = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": utcnow(),
        }
        self.store.put_json(uri, claim)
        self._claimed = True

    def finished(self) -> dict | None:
        """The published manifest if it is for the same inputs, else None."""
        # One request: an exists-then-get could see a manifest that a concurrent writer withdraws in between.
        manifest = self.store.get_json_or_none(self.uri(MANIFEST))
        return manifest if isinstance(manifest, dict) and manifest.get("fingerprint") == self.fingerprint else None

    def unpublish(self, keep_same_inputs: bool = False) -> None:
        """Withdraw an earlier manifest before overwriting, so readers never see a mix. `keep_same_inputs`:
        for content-addressed outputs (ingest's dataset versions), where a manifest for the same inputs that a
        concurrent writer published meanwhile lists the very bytes this run is about to write: it stays (two
        ingests of one source, the first publishing while the second checked, made the first fail its
        read-back when the second withdrew its manifest)."""
        self._claim()
        uri = self.uri(MANIFEST)
        current = self.store.get_json_or_none(uri)
        if current is None:
            return
        if keep_same_inputs and isinstance(current, dict) and current.get("fingerprint") == self.fingerprint:
            return
        self.store.delete(uri)

    def put_bytes(self, name: str, data: bytes, content_type: str | None = None) -> S3Uri:
        self._claim()
        uri = self.store.put_bytes(self.uri(name), data, content_type)
        self.files[name] = {"sha256": sha256_bytes(data), "size": len(data)}
        return uri

    def put_json(self, name: str, obj: Any) -> S3Uri:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.put_bytes(name, data, "application/json")

    def put_text(self, name: str, text: str, content_type: str = "text/plain; charset=utf-8") -> S3Uri:
        return self.put_bytes(name, text.encode(), content_type)

    def put_file(self, name: str, path: Path, sha256: str | None = None, content_type: str | None = None) -> S3Uri:
        self._claim()
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
            "owner": self.owner,
            **extra,
        }
        self._claim()
        self.store.put_json(self.uri(MANIFEST), manifest)
        # Read back: a writer for other inputs that published in the same instant must not leave a
        # manifest that this run reports as its own.
        current = self.store.get_json_or_none(self.uri(MANIFEST))
        if not isinstance(current, dict) or current.get("fingerprint") != self.fingerprint:
            raise StageError(
                f"another run published or withdrew {self.prefix} at the same time as this one; not reporting it"
            )
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


@dataclass(frozen=True)
class StageIO:
    """What the command line tells a stage besides its settings: where it reads and writes, and how it runs.

    - `inputs`: the stage's own flags (the ones its `add_arguments` declares) other than `--out`, by their
      argparse dest (`--official-splits` -> `"official_splits"`), as argparse typed them (an `s3://` or local
      location as given, a JSON object as a dict, a `Path`), None where not given: the prefixes and files it
      reads and the facts Airflow hands it about the run. Read-only.
    - `out`: the `--out` output prefix as given, None for a stage without one (ingest writes under
      `inputs["datasets"]`, notify under `inputs["report_out"]`, promote into `inputs["registry"]`).
    - `force`: `--force`, redo the work even if a finished output exists.
    - `argv`: the whole command line after `python -m dermaops` (a launcher starts its ranks with it).

    Locations stay the strings given (parsed where the stage parses them), so a bad one fails where it did,
    with the same line, after the settings' checks.
    """

    inputs: Mapping[str, Any] = field(default_factory=dict)
    out: str | None = None
    force: bool = False
    argv: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "argv", tuple(self.argv))

    @staticmethod
    def locations(add_arguments: Callable[[argparse.ArgumentParser], None]) -> tuple[str, ...]:
        """The dests of the flags a stage's `add_arguments` declares (read off a throwaway parser): the one list
        of its locations, so that nothing is declared twice."""
        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        return tuple(action.dest for action in parser._actions)  # argument groups' flags included

    @classmethod
    def from_args(cls, args: argparse.Namespace, locations: Sequence[str], argv: Sequence[str]) -> StageIO:
        """The IO of parsed flags: the values of `locations` (the stage's declared dests), `--force` and `argv`."""
        values = {name: getattr(args, name) for name in locations}
        inputs = {name: value for name, value in values.items() if name != "out"}
        return cls(inputs=inputs, out=values.get("out"), force=bool(args.force), argv=tuple(argv))


class scratch_dir:
    """A scratch directory private to this process.

    With DERMAOPS_SCRATCH_DIR (or --scratch-dir) set, the directory is shared by every stage process
    of the machine and kept, for download caches and partial downloads that a retry resumes. Each
    process works in one slot of it, `<dir>/slot-<n>`, held with an exclusive lock (flock) on
    `<dir>/slot-<n>.lock` for the process's lifetime: two processes never share a slot (two ingests of
    one source no longer delete each other's files), and a later process, a retry after a crash
    included, gets the lowest free slot back with its caches (the kernel drops a dead process's lock).
    Without it, a temporary directory removed at exit.
    """

    def __init__(self, explicit: str | None = None):
        self.explicit = explicit or os.environ.get("DERMAOPS_SCRATCH_DIR")
        self._tmp: str | None = None
        self._lock = None

    def __enter__(self) -> Path:
        if self.explicit:
            root = Path(self.explicit)
            root.mkdir(parents=True, exist_ok=True)
            return self._take_slot(root)
        self._tmp = tempfile.mkdtemp(prefix="dermaops-")
        return Path(self._tmp)

    def _take_slot(self, root: Path) -> Path:
        import fcntl

        for n in range(1024):
            lock = open(root / f"slot-{n}.lock", "a+")  # noqa: SIM115 - held open until __exit__
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self._lock = lock
            path = root / f"slot-{n}"
            path.mkdir(exist_ok=True)
            return path
        raise StageError(f"scratch directory {root}: all 1024 slots are in use by other processes")

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
