"""An exclusive, expiring lease on one S3 object: a mutex between processes on different machines that
share nothing but the bucket (the registry's promotions, dermaops.promotion).

The lease object holds who has it and until when. Every change to it is a conditional write, so two
processes can never both believe they hold it:

- acquire: create it with `If-None-Match: *` (only one creator wins), or replace a lease that was
  released or has expired with `If-Match: <the ETag just read>` (only one replacer wins);
- release: mark it released with `If-Match: <our ETag>`, so a holder whose lease expired and was taken
  over never releases the new holder's lease.

A holder that crashes never releases: its lease is taken over once `expires_at` has passed, so a crash
blocks the others for at most `ttl` seconds. Waiters poll until `wait` seconds have passed, then fail
with a transient error (exit 3: the orchestrator retries) naming the holder. Expiry is judged on the
waiter's clock against the holder's `expires_at` (UTC): clocks must agree to well within `ttl`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from dermaops.errors import StageError, TransientError
from dermaops.store import ArtifactStore, S3Uri, json_bytes

log = logging.getLogger(__name__)


def _stamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


def _expired(lease: dict, now: float) -> bool:
    try:
        return dt.datetime.fromisoformat(lease["expires_at"]).timestamp() <= now
    except (KeyError, TypeError, ValueError):
        return True  # unreadable: nobody can prove they hold it


class Lease:
    """`with Lease(store, uri, {"purpose": ...}, ttl=120, wait=180):` the body runs while this process
    holds the lease. The body should take well under `ttl` seconds (see `still_held`)."""

    def __init__(
        self, store: ArtifactStore, uri: S3Uri, holder: dict[str, Any], ttl: float, wait: float, poll: float = 0.25
    ):
        self.store, self.uri, self.ttl, self.wait, self.poll = store, uri, ttl, wait, poll
        self.holder = {**holder, "host": socket.gethostname(), "pid": os.getpid(), "owner": uuid.uuid4().hex}
        self.etag: str | None = None
        self.expires = 0.0

    def _read(self) -> tuple[dict | None, str | None]:
        data, etag = self.store.get_with_etag(self.uri)
        if data is None:
            return None, None
        try:
            lease = json.loads(data)
        except ValueError:
            lease = {}
        return (lease if isinstance(lease, dict) else {}), etag

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            now = time.time()
            body = {**self.holder, "acquired_at": _stamp(now), "expires_at": _stamp(now + self.ttl)}
            current, etag = self._read()
            if current is None:
                self.etag = self.store.put_if(self.uri, json_bytes(body), if_none_match=True)
            elif current.get("released") or _expired(current, now):
                if not current.get("released"):
                    log.warning(
                        "taking over the lease %s of %s (pid %s on %s), expired at %s: its holder crashed or stalled",
                        self.uri, current.get("purpose"), current.get("pid"), current.get("host"),
                        current.get("expires_at"),
                    )  # fmt: skip
                self.etag = self.store.put_if(self.uri, json_bytes(body), if_match=etag)
            if self.etag is not None:
                self.expires = now + self.ttl
                return
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"{self.uri} is held by {current.get('purpose') if current else 'another process'} "
                    f"(pid {current.get('pid') if current else '?'} on {current.get('host') if current else '?'}, "
                    f"until {current.get('expires_at') if current else '?'}); waited {self.wait:.0f} s, try again"
                )
            time.sleep(self.poll)

    def still_held(self) -> bool:
        """True while this process's lease has not expired (another process may take it over after)."""
        return self.etag is not None and time.time() < self.expires

    def release(self) -> None:
        if self.etag is None:
            return
        released = {**self.holder, "released": True, "released_at": _stamp(time.time())}
        try:
            if self.store.put_if(self.uri, json_bytes(released), if_match=self.etag) is None:
                log.warning("the lease %s was taken over after it expired; the new holder keeps it", self.uri)
        except StageError as exc:
            # Not fatal (and never hiding the error the body may be raising): it expires by itself.
            log.warning("could not release the lease %s (%s); it expires at %s", self.uri, exc, _stamp(self.expires))
        self.etag = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
