"""Persistence for the embedded S3 server (dermaops.embedded_s3): its buckets and objects saved to a folder
and loaded back, so that a restart of the compose stack's MinIO stand-in keeps dataset versions, run
outputs and the model registry.

Runs inside the process that runs moto's ThreadedMotoServer and works on moto's in-process S3 backend
directly (not over HTTP): no credentials are involved, and objects keep what a client cannot set, above
all their ETag. Promotions write registry/ham10000/champion.json with If-Match on the ETag they read
before the restart; moto's ETag of a plain PUT is the body's MD5, but a multipart object's is
"<md5 of the part md5s>-<parts>", which re-putting the bytes in one piece would change. So each object's
ETag is stored and set back on the restored key.

Layout of `state_dir` (it may be a volume's mount point, which cannot itself be renamed, so every swap
happens inside it):

    CURRENT                     the name of the live snapshot folder, replaced atomically
    snapshot-<stamp>/index.json buckets, and per object its blob, size, sha256, ETag, metadata, ...
    snapshot-<stamp>/blobs/<n>  the object's bytes
    .tmp-snapshot-<stamp>/      a save in progress; renamed to snapshot-<stamp> once complete

A save writes a new snapshot folder beside the live one, fsyncs it, renames it into place and only then
points CURRENT at it; a crash at any moment leaves CURRENT naming a complete snapshot (or no CURRENT:
nothing saved yet). Objects unchanged since the live snapshot (same ETag, size and last-modified time)
are hard-linked from it instead of rewritten, so a restart with nothing new saves in well under a
second. Bytes are streamed in chunks both ways: an object is never held whole in memory.

What is not kept: object versions other than the current one, multipart uploads in progress (their
client gets NoSuchUpload and retries), ACLs other than moto's default, bucket settings (policies,
versioning, lifecycle). The project's bucket uses none of them.

moto internals used (moto 5.2, pinned in requirements.lock): `s3_backends`, `FakeKey`'s value buffer,
lock and size (`_value_buffer`, `lock`, `contentsize`); tests/test_s3_snapshot.py breaks if they change.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

FORMAT = "dermaops-s3-snapshot/1"
CURRENT = "CURRENT"
INDEX = "index.json"
BLOBS = "blobs"
PREFIX = "snapshot-"
TMP_PREFIX = ".tmp-snapshot-"
CHUNK = 8 * 1024 * 1024
# FakeKey attributes restored as they were (all JSON values). Content-Type, Content-Encoding, Cache-Control
# and the user metadata (x-amz-meta-*) live in the key's metadata, saved separately.
KEY_FIELDS = (
    "encryption",
    "kms_key_id",
    "bucket_key_enabled",
    "checksum_algorithm",
    "checksum_value",
    "checksum_type",
    "checksum_parts",
    "website_redirect_location",
    "lock_mode",
    "lock_legal_status",
    "lock_until",
)


class SnapshotError(RuntimeError):
    """A snapshot that cannot be written or read; the message is one line naming the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _live(state_dir: Path) -> Path | None:
    """The live snapshot folder CURRENT names, None when nothing was saved yet."""
    pointer = state_dir / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read {pointer}: {exc.strerror}") from None
    if not name.startswith(PREFIX) or "/" in name or not (state_dir / name).is_dir():
        raise SnapshotError(f"{pointer} names no snapshot folder in {state_dir} (it says {name[:80]!r})")
    return state_dir / name


def _backend_buckets():
    """(account id, partition, FakeBucket) of every bucket the process's moto S3 backends hold."""
    from moto.s3.models import s3_backends

    # bucket_accounts: moto's global name -> (partition, account) map, which covers every account.
    for name, (partition, account_id) in sorted(dict(s3_backends.bucket_accounts).items()):
        bucket = s3_backends[account_id][partition].buckets.get(name)
        if bucket is not None:
            yield account_id, partition, bucket


def _stream_key_to(key, path: Path) -> tuple[int, str]:
    """Copy a FakeKey's bytes to `path` chunk by chunk; (size, sha256). The key's lock is taken per chunk
    (with the offset set each time), so GETs served meanwhile interleave instead of waiting for the file."""
    digest = hashlib.sha256()
    offset = 0
    with open(path, "wb") as out:
        while True:
            with key.lock:
                key._value_buffer.seek(offset)
                chunk = key._value_buffer.read(CHUNK)
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            offset += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return offset, digest.hexdigest()


def _same_object(entry: dict | None, record: dict) -> bool:
    return entry is not None and all(entry.get(k) == record[k] for k in ("etag", "size", "last_modified"))


def _previous_index(state_dir: Path) -> tuple[Path | None, dict[tuple[str, str], dict]]:
    """The live snapshot and its objects by (bucket, key), for reuse; nothing if it is unreadable (a save must
    not fail because the previous snapshot is damaged: it is being replaced)."""
    try:
        live = _live(state_dir)
        if live is None:
            return None, {}
        index = json.loads((live / INDEX).read_text())
        objects = {(o["bucket"], o["key"]): o for b in index["buckets"] for o in b["objects"]}
        return live, objects
    except (SnapshotError, OSError, ValueError, KeyError, TypeError):
        return None, {}


def save(state_dir: Path) -> int:
    """Write every bucket and object of the running moto S3 backend to `state_dir`; returns the object count.

    Atomic: readers (load) see the previous snapshot until this one is complete. Raises SnapshotError (one
    line naming the path) when the folder cannot be written."""
    state_dir = Path(state_dir)
    try:
        return _save(state_dir)
    except OSError as exc:
        where = exc.filename or state_dir
        raise SnapshotError(f"cannot save the S3 snapshot to {where}: {exc.strerror or exc}") from None


def _save(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"{PREFIX}{stamp}-{os.getpid()}"
    tmp = state_dir / f"{TMP_PREFIX}{stamp}-{os.getpid()}"
    try:
        count = _write_snapshot(state_dir, tmp, stamp)
        tmp.rename(state_dir / name)
    except BaseException:
        # A full disk must not keep a half snapshot's bytes on it; the live snapshot is untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(state_dir)
    # The switch: CURRENT names the new snapshot from this replace on.
    pointer = state_dir / f"{CURRENT}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    pointer.replace(state_dir / CURRENT)
    _fsync_dir(state_dir)
    # Only our own names go: the folder may hold other files (a volume that once was MinIO's).
    for stale in state_dir.iterdir():
        if stale.name != name and stale.name.startswith((PREFIX, TMP_PREFIX)):
            shutil.rmtree(stale, ignore_errors=True)
    return count


def _write_snapshot(state_dir: Path, tmp: Path, stamp: str) -> int:
    """Every bucket and object into the folder `tmp` (blobs, then the index), fsynced; the object count."""
    previous, reusable = _previous_index(state_dir)
    (tmp / BLOBS).mkdir(parents=True)
    buckets: list[dict] = []
    count = 0
    for account_id, partition, bucket in _backend_buckets():
        objects = []
        for key_name, key in bucket.keys.items():
            record = _save_key(key_name, key, bucket, tmp, count, previous, reusable)
            if record is not None:  # None: deleted while the save ran
                objects.append(record)
                count += 1
        buckets.append(
            {
                "name": bucket.name,
                "account_id": account_id,
                "partition": partition,
                "region": bucket.region_name,
                "objects": objects,
            }
        )
    with open(tmp / INDEX, "w") as f:
        json.dump({"format": FORMAT, "saved_at": stamp, "objects": count, "buckets": buckets}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp / BLOBS)
    _fsync_dir(tmp)
    return count


def _record(key_name: str, key, bucket) -> dict:
    """What the index keeps of one object, its blob aside."""
    from moto.s3.models import s3_backends

    return {
        "bucket": bucket.name,
        "key": key_name,
        "etag": key.etag.strip('"'),
        "size": key.size,
        "last_modified": key.last_modified.isoformat(),
        "storage_class": key.storage_class,
        "metadata": dict(key.metadata),
        "tags": s3_backends[key.account_id][key.partition].tagger.get_tag_dict_for_resource(key.arn),
        **{field: getattr(key, field, None) for field in KEY_FIELDS},
    }


def _save_key(key_name: str, key, bucket, tmp: Path, n: int, previous: Path | None, reusable: dict) -> dict | None:
    """One object into the new snapshot as blob n: hard-linked from the live snapshot when unchanged, else
    streamed. None when the object was deleted while the save ran."""
    blob = f"{BLOBS}/{n:08d}"
    for _ in range(3):
        try:
            record = {**_record(key_name, key, bucket), "blob": blob}
            old = reusable.get((bucket.name, key_name))
            if _same_object(old, record):
                try:
                    os.link(previous / old["blob"], tmp / blob)
                    return {**record, "sha256": old["sha256"]}
                except OSError:
                    pass  # no hard links on this file system, or the old blob is gone: write it
            size, sha256 = _stream_key_to(key, tmp / blob)
            return {**record, "size": size, "sha256": sha256}
        except ValueError:
            # moto closes a key's buffer when the key is overwritten or deleted: a PUT or DELETE served while
            # this save ran. Save what is there now instead.
            key = bucket.keys.get(key_name)
            if key is None:
                return None
    raise SnapshotError(f"s3://{bucket.name}/{key_name} kept changing while the S3 snapshot was saved")


def load(state_dir: Path) -> int:
    """Restore what `save` wrote into the running moto S3 backend (buckets created as needed); returns the
    object count. A missing or empty `state_dir` loads 0. A damaged snapshot raises SnapshotError naming the
    file, and then nothing is loaded."""
    state_dir = Path(state_dir)
    live = _live(state_dir) if state_dir.is_dir() else None
    if live is None:
        return 0
    index_path = live / INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"unreadable S3 snapshot index {index_path}: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise SnapshotError(f"{index_path} is not a {FORMAT} index (format: {found!r})")
    # Every key is built and checked before any goes into the backend: a damaged snapshot loads nothing.
    built: list[tuple[Any, Any, dict]] = []
    try:
        for bucket in index["buckets"]:
            backend = _backend(bucket["account_id"], bucket["partition"])
            for record in bucket["objects"]:
                built.append((backend, *_restore_key(live, bucket, record)))
        for bucket in index["buckets"]:
            backend = _backend(bucket["account_id"], bucket["partition"])
            if bucket["name"] not in backend.buckets:
                backend.create_bucket(bucket["name"], bucket["region"])
    except BaseException as exc:
        for _, key, _ in built:
            key.dispose()
        if isinstance(exc, KeyError | TypeError):
            problem = f"{type(exc).__name__}: {exc}"
            raise SnapshotError(f"{index_path} lacks a field or has a wrong one ({problem})") from None
        raise
    for backend, key, tags in built:
        target = backend.buckets[key.bucket_name]
        target.keys.setlist(key.name, [key])  # disposes an existing key of that name
        if tags:
            backend.put_object_tagging(key, tags)
    return len(built)


def _backend(account_id: str, partition: str):
    from moto.s3.models import s3_backends

    return s3_backends[account_id][partition]


def _restore_key(live: Path, bucket: dict, record: dict):
    """A FakeKey (and its tags) rebuilt from one index record, its bytes streamed in and checked."""
    from moto.s3.models import FakeKey

    blob = live / record["blob"]
    key = FakeKey(
        name=record["key"],
        value=b"",
        account_id=bucket["account_id"],
        region_name=bucket["region"],
        storage=record["storage_class"],
        etag=record["etag"],
        bucket_name=bucket["name"],
        version_id="null",
    )
    try:
        digest = hashlib.sha256()
        size = 0
        with open(blob, "rb") as f, key.lock:
            while chunk := f.read(CHUNK):
                key._value_buffer.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            key.contentsize = size
    except OSError as exc:
        key.dispose()
        raise SnapshotError(f"cannot read S3 snapshot blob {blob} ({record['key']}): {exc.strerror}") from None
    if (size, digest.hexdigest()) != (record["size"], record["sha256"]):
        key.dispose()
        raise SnapshotError(
            f"S3 snapshot blob {blob} ({record['key']}) is damaged: {size} bytes, sha256 {digest.hexdigest()[:16]}; "
            f"the index says {record['size']} bytes, sha256 {record['sha256'][:16]}"
        )
    key.set_metadata(dict(record["metadata"]))
    for field in KEY_FIELDS:
        if record.get(field) is not None:
            setattr(key, field, record[field])
    key.last_modified = dt.datetime.fromisoformat(record["last_modified"])
    return key, record.get("tags") or {}
