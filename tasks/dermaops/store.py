"""The artifact store: plain S3 through boto3, so MinIO, AWS and the embedded loopback server
need no code change.

Configuration is the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) plus DERMAOPS_S3_ENDPOINT_URL, which
wins when set. Any custom endpoint switches to path-style addressing, which MinIO and loopback
servers need.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dermaops.errors import StageError, TransientError

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise StageError(f"not an S3 URI: {uri!r} (expected s3://<bucket>/<key>)")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StageError(f"S3 URI has no bucket: {uri!r}")
        return cls(bucket, key.rstrip("/"))

    def join(self, *parts: str) -> S3Uri:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p and p.strip("/"))
        return S3Uri(self.bucket, key)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def endpoint_url(environ: Mapping[str, str] = os.environ) -> str | None:
    return (
        environ.get("DERMAOPS_S3_ENDPOINT_URL") or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    ) or None


def make_client(environ: Mapping[str, str] | None = None):
    """An S3 client configured from `environ` (default: this process's environment, where boto3 also
    finds the credentials); an explicit `environ` supplies the key too, e.g. one role's (dermaops.access)."""
    import boto3
    from botocore.config import Config

    keys = {}
    if environ is not None:
        keys = {
            "aws_access_key_id": environ["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": environ["AWS_SECRET_ACCESS_KEY"],
        }
    environ = os.environ if environ is None else environ
    url = endpoint_url(environ)
    config = Config(
        retries={"max_attempts": 8, "mode": "standard"},
        s3={"addressing_style": "path" if url else "auto"},
        connect_timeout=10,
        read_timeout=120,
    )
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION") or "us-east-1",
        config=config,
        **keys,
    )


def _as_uri(uri: str | S3Uri) -> S3Uri:
    return uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)


class ArtifactStore:
    """Small, explicit wrapper over an S3 client. Every method takes s3:// URIs."""

    def __init__(self, client=None):
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = make_client()
        return self._client

    # -- errors ---------------------------------------------------------------------------
    def _translate(self, exc: Exception, uri: S3Uri, action: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StageError(f"bucket does not exist: s3://{uri.bucket} (while trying to {action} {uri})")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StageError(f"no such object: {uri}")
            if code in ("AccessDenied", "403"):
                # The key is valid but its policy does not cover this (dermaops.access: each stage's key
                # writes only its own prefixes).
                return StageError(f"access denied: this S3 key may not {action} {uri} ({code})")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StageError(f"S3 rejected the credentials ({code}) while trying to {action} {uri}; check them")
            return TransientError(f"S3 error {code or exc} while trying to {action} {uri}")
        if isinstance(exc, BotoCoreError):
            return TransientError(f"cannot reach S3 ({type(exc).__name__}: {exc}) while trying to {action} {uri}")
        return exc

    # -- reads ----------------------------------------------------------------------------
    def exists(self, uri: str | S3Uri) -> bool:
        from botocore.exceptions import ClientError

        u = _as_uri(uri)
        try:
            self.client.head_object(Bucket=u.bucket, Key=u.key)
            return True
        except ClientError as exc:
            if _missing(exc):
                return False
            raise self._translate(exc, u, "check") from exc
        except Exception as exc:
            raise self._translate(exc, u, "check") from exc

    def get_bytes(self, uri: str | S3Uri) -> bytes:
        u = _as_uri(uri)
        try:
            return self.client.get_object(Bucket=u.bucket, Key=u.key)["Body"].read()
        except Exception as exc:
            raise self._translate(exc, u, "read") from exc

    def get_json(self, uri: str | S3Uri) -> Any:
        return _parse_json(self.get_bytes(uri), uri)

    def get_json_or_none(self, uri: str | S3Uri) -> Any:
        """The JSON object at `uri`, or None when there is none (one request instead of exists + get)."""
        from botocore.exceptions import ClientError

        u = _as_uri(uri)
        try:
            data = self.client.get_object(Bucket=u.bucket, Key=u.key)["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                return None
            raise self._translate(exc, u, "read") from exc
        except Exception as exc:
            raise self._translate(exc, u, "read") from exc
        return _parse_json(data, uri)

    def get_with_etag(self, uri: str | S3Uri) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of the object at `uri`, or (None, None) when there is none: the ETag is what a
        conditional write (`put_if`) compares against."""
        from botocore.exceptions import ClientError

        u = _as_uri(uri)
        try:
            response = self.client.get_object(Bucket=u.bucket, Key=u.key)
            return response["Body"].read(), response["ETag"]
        except ClientError as exc:
            if _missing(exc):
                return None, None
            raise self._translate(exc, u, "read") from exc
        except Exception as exc:
            raise self._translate(exc, u, "read") from exc

    def open(self, uri: str | S3Uri, start: int = 0) -> BinaryIO:
        """A streaming body (file-like, `.read(n)` / `.iter_chunks()`), optionally from a byte offset."""
        u = _as_uri(uri)
        kwargs = {"Range": f"bytes={start}-"} if start else {}
        try:
            return self.client.get_object(Bucket=u.bucket, Key=u.key, **kwargs)["Body"]
        except Exception as exc:
            raise self._translate(exc, u, "read") from exc

    def download(self, uri: str | S3Uri, path: Path) -> Path:
        u = _as_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            self.client.download_file(u.bucket, u.key, str(tmp))
        except Exception as exc:
            raise self._translate(exc, u, "download") from exc
        tmp.replace(path)
        return path

    def size(self, uri: str | S3Uri) -> int:
        u = _as_uri(uri)
        try:
            return int(self.client.head_object(Bucket=u.bucket, Key=u.key)["ContentLength"])
        except Exception as exc:
            raise self._translate(exc, u, "check") from exc

    def list(self, prefix: str | S3Uri) -> Iterator[tuple[S3Uri, int]]:
        """Objects under a prefix (a "folder": a trailing slash is implied), as (uri, size)."""
        u = _as_uri(prefix)
        key_prefix = u.key.rstrip("/") + "/" if u.key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=u.bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    yield S3Uri(u.bucket, obj["Key"]), int(obj["Size"])
        except Exception as exc:
            raise self._translate(exc, u, "list") from exc

    # -- writes ---------------------------------------------------------------------------
    def put_bytes(self, uri: str | S3Uri, data: bytes, content_type: str | None = None) -> S3Uri:
        u = _as_uri(uri)
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=u.bucket, Key=u.key, Body=data, **extra)
        except Exception as exc:
            raise self._translate(exc, u, "write") from exc
        return u

    def put_if(
        self,
        uri: str | S3Uri,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
    ) -> str | None:
        """A conditional PUT (S3's If-Match / If-None-Match: *, honoured by AWS S3, MinIO and the embedded
        moto server, tests/test_promotion.py): the new ETag, or None when the condition did not hold,
        i.e. the object is no longer the one with ETag `if_match`, or (`if_none_match`) it exists."""
        from botocore.exceptions import ClientError

        if (if_match is None) == (not if_none_match):
            raise ValueError("put_if needs exactly one of if_match and if_none_match")
        u = _as_uri(uri)
        condition = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
        try:
            response = self.client.put_object(
                Bucket=u.bucket, Key=u.key, Body=data, ContentType=content_type, **condition
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            # 412: the condition failed; 409: another conditional write to the key was in flight (AWS);
            # NoSuchKey: If-Match on an object that was deleted meanwhile.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or _missing(exc):
                return None
            raise self._translate(exc, u, "write") from exc
        except Exception as exc:
            raise self._translate(exc, u, "write") from exc
        return response["ETag"]

    def put_json(self, uri: str | S3Uri, obj: Any) -> S3Uri:
        return self.put_bytes(uri, json_bytes(obj), "application/json")

    def put_file(self, uri: str | S3Uri, path: Path, content_type: str | None = None) -> S3Uri:
        """Upload a local file (multipart for large files, handled by boto3's transfer manager)."""
        u = _as_uri(uri)
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.client.upload_file(str(path), u.bucket, u.key, ExtraArgs=extra)
        except Exception as exc:
            raise self._translate(exc, u, "upload") from exc
        return u

    def delete(self, uri: str | S3Uri) -> None:
        u = _as_uri(uri)
        try:
            self.client.delete_object(Bucket=u.bucket, Key=u.key)
        except Exception as exc:
            raise self._translate(exc, u, "delete") from exc

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket if missing (used by the embedded default and the compose init)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError:
            self.client.create_bucket(Bucket=bucket)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def json_bytes(obj: Any) -> bytes:
    """How every JSON object is stored: indented, sorted keys."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _missing(exc) -> bool:
    """A botocore ClientError that means "no such object"."""
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _parse_json(data: bytes, uri) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StageError(f"not valid JSON: {uri} ({exc})") from exc
