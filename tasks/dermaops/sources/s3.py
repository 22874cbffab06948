"""An S3 prefix holding the release files, read through the same store (endpoint, credentials) as
the artifacts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dermaops.errors import StageError, TransientError
from dermaops.safepath import local_path
from dermaops.sources.base import Source, SourceFile, release_files
from dermaops.sources.transfer import CHUNK, Fetched, Retryable, Stream, TransferSettings, fetch_resumable
from dermaops.store import ArtifactStore, S3Uri


class S3Source(Source):
    kind = "s3"

    def __init__(self, uri: str, settings: TransferSettings, store: ArtifactStore | None = None):
        self.prefix = S3Uri.parse(uri)
        self.settings = settings
        self.store = store or ArtifactStore()

    @property
    def identity(self) -> str:
        return f"s3:{self.prefix}"

    @property
    def location(self) -> str:
        return str(self.prefix)

    def files(self) -> list[SourceFile]:
        return release_files(self._lookup, lambda name: str(self.prefix.join(name)))

    def _lookup(self, name: str) -> SourceFile | None:
        from botocore.exceptions import BotoCoreError, ClientError

        uri = self.prefix.join(name)
        try:
            head = self.store.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("403", "AccessDenied"):
                raise StageError(f"access denied to {uri}; check the S3 credentials") from exc
            raise TransientError(f"S3 error {code} while checking {uri}") from exc
        except BotoCoreError as exc:
            raise TransientError(f"cannot reach S3 while checking {uri}: {exc}") from exc
        etag = head.get("ETag")
        return SourceFile(name, str(uri), int(head["ContentLength"]), stamp=f"etag:{etag}" if etag else None)

    def fetch(self, file: SourceFile, workdir: Path) -> Fetched:
        uri = S3Uri.parse(file.location)

        @contextmanager
        def open_at(offset: int) -> Iterator[Stream]:
            try:
                body = self.store.open(uri, start=offset)
            except TransientError as exc:
                raise Retryable(str(exc)) from exc
            try:
                yield Stream(_chunks(body), offset, file.size)
            finally:
                body.close()

        dest = local_path(workdir, file.name, "source file")
        return fetch_resumable(file.name, file.location, open_at, dest, self.settings)


def _chunks(body) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    try:
        yield from body.iter_chunks(CHUNK)
    except (BotoCoreError, HTTPError, OSError) as exc:
        raise Retryable(f"{type(exc).__name__}: {exc}") from exc
