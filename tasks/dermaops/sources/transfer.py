"""Fetching one file from a source robustly: streamed to a scratch file, hashed while streaming,
retried with bounded exponential backoff, resumed from where it stopped when the source allows.

A source only says how to open a byte stream at an offset (`open_at`); everything about attempts,
partial files, digests and progress logging lives here, so http, Dataverse and S3 behave alike.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dermaops.errors import StageError, TransientError

CHUNK = 1024 * 1024
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferSettings:
    retries: int = 5
    base_delay: float = 2.0
    max_delay: float = 60.0
    timeout: float = 60.0
    progress_every: float = 30.0

    def delays(self) -> Iterator[float]:
        """Sleeps between attempts: doubling from base_delay, capped, with jitter so that many
        workers retrying the same server do not hit it in lockstep."""
        for attempt in range(self.retries):
            delay = min(self.max_delay, self.base_delay * 2**attempt)
            yield delay * random.uniform(0.5, 1.0)


class Retryable(Exception):
    """A failure worth another attempt: connection reset, timeout, 5xx, 429, truncated body."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RestartFromZero(Retryable):
    """The partial file cannot be continued (range refused or inconsistent): start over."""


class ChecksumMismatch(Retryable):
    """The bytes differ from the checksum the source published. Retried from scratch once the budget
    allows (a resumed file may mix two versions); if it persists it is a data error, not a network one."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name: md5, sha1, sha256, sha512
    value: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.value}"


@dataclass(frozen=True)
class Fetched:
    """A source file available locally (in scratch, or in place for a local directory)."""

    name: str
    path: Path
    sha256: str
    size: int
    location: str


@dataclass(frozen=True)
class Stream:
    """An open byte stream. `start` is the offset the source actually serves from (0 when it
    ignored the range); `total` is the full file size when known. `chunks` raises Retryable on
    transport failures."""

    chunks: Iterator[bytes]
    start: int
    total: int | None


class Digests:
    def __init__(self, extra: str | None = None):
        self.sha256 = hashlib.sha256()
        self.extra = hashlib.new(extra) if extra and extra != "sha256" else None

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.extra is not None:
            self.extra.update(data)

    def hexdigest(self, algorithm: str) -> str:
        return self.sha256.hexdigest() if algorithm == "sha256" else self.extra.hexdigest()


class Progress:
    """Logs `name: done/total MB (pct), MB/s` at most every `every` seconds, and once at the end."""

    def __init__(self, name: str, every: float):
        self.name = name
        self.every = every
        self.started = self.last = time.monotonic()
        self.first_byte = 0

    def begin(self, offset: int) -> None:
        self.first_byte = offset

    def update(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s: %s", self.name, self._describe(done, total, now))

    def finish(self, done: int) -> None:
        log.info("%s: done, %s", self.name, self._describe(done, done, time.monotonic()))

    def _describe(self, done: int, total: int | None, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = (done - self.first_byte) / elapsed / 1e6
        size = f"{done / 1e6:.1f} MB"
        if total:
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done / total:.1f} %)"
        return f"{size} in {elapsed:.1f} s, {rate:.1f} MB/s"


def with_retries(what: str, call: Callable[[], T], settings: TransferSettings) -> T:
    """Run a small request (a listing, a HEAD) under the same retry policy as downloads."""
    delays = settings.delays()
    attempt = 1
    while True:
        try:
            return call()
        except Retryable as exc:
            delay = _next_delay(delays, exc, settings)
            if delay is None:
                raise TransientError(f"giving up on {what} after {attempt} attempts: {exc}") from exc
            log.warning("%s: attempt %d failed (%s); retrying in %.2f s", what, attempt, exc, delay)
            time.sleep(delay)
            attempt += 1


def fetch_resumable(
    name: str,
    location: str,
    open_at: Callable[[int], AbstractContextManager[Stream]],
    dest: Path,
    settings: TransferSettings,
    expected: Checksum | None = None,
) -> Fetched:
    """Stream `location` into `dest`, resuming `dest.part` (also one left by an earlier process)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    part = dest.with_name(dest.name + ".part")
    algorithm = expected.algorithm if expected else "sha256"
    digests = Digests(algorithm)
    offset = 0
    if part.exists():
        offset = _rehash(part, digests)
        log.info("%s: resuming the partial download at byte %d", name, offset)
    progress = Progress(name, settings.progress_every)
    delays = settings.delays()
    attempt = 1
    while True:
        try:
            with open_at(offset) as stream:
                if stream.start != offset:
                    if stream.start != 0:
                        raise RestartFromZero(f"asked for byte {offset}, got byte {stream.start}")
                    if offset:
                        log.info("%s: the source ignored the range request; restarting from byte 0", name)
                    offset, digests = 0, Digests(algorithm)
                progress.begin(offset)
                with open(part, "ab" if offset else "wb") as f:
                    for chunk in stream.chunks:
                        f.write(chunk)
                        digests.update(chunk)
                        offset += len(chunk)
                        progress.update(offset, stream.total)
                if stream.total is not None and offset < stream.total:
                    raise Retryable(f"truncated body: got {offset} of {stream.total} bytes")
            if expected and digests.hexdigest(algorithm) != expected.value.lower():
                raise ChecksumMismatch(
                    f"checksum mismatch for {name}: {algorithm} expected {expected.value.lower()}, "
                    f"got {digests.hexdigest(algorithm)} ({location})"
                )
            break
        except Retryable as exc:
            if isinstance(exc, RestartFromZero | ChecksumMismatch):
                part.unlink(missing_ok=True)
                offset, digests = 0, Digests(algorithm)
            delay = _next_delay(delays, exc, settings)
            if delay is None:
                if isinstance(exc, ChecksumMismatch):
                    raise StageError(str(exc)) from exc
                raise TransientError(f"giving up on {location} after {attempt} attempts: {exc}") from exc
            log.warning(
                "%s: attempt %d failed (%s); retrying in %.2f s from byte %d", name, attempt, exc, delay, offset
            )
            time.sleep(delay)
            attempt += 1
    part.replace(dest)
    progress.finish(offset)
    return Fetched(name, dest, digests.hexdigest("sha256"), offset, location)


def hash_in_place(name: str, path: Path, location: str, settings: TransferSettings) -> Fetched:
    """A file that is already local: hash it where it is (no copy), logging progress."""
    digests = Digests()
    progress = Progress(name, settings.progress_every)
    size = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digests.update(chunk)
            done += len(chunk)
            progress.update(done, size)
    progress.finish(done)
    return Fetched(name, path, digests.hexdigest("sha256"), done, location)


def _rehash(path: Path, digests: Digests) -> int:
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digests.update(chunk)
            size += len(chunk)
    return size


def _next_delay(delays: Iterator[float], exc: Retryable, settings: TransferSettings) -> float | None:
    delay = next(delays, None)
    if delay is not None and exc.retry_after is not None:
        # Honour the server's Retry-After, but never wait longer than our own cap.
        delay = min(settings.max_delay, max(delay, exc.retry_after))
    return delay
