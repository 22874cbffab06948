"""The embedded S3 server's snapshot (dermaops.s3_snapshot): objects survive a restart with their bytes, content
type, user metadata, checksums and ETags, so a promotion's If-Match on champion.json written before the restart
still holds after it.

The servers run in subprocesses (`python -m dermaops.embedded_s3 --state-dir`): moto's backend is global to a
process, and this test session has its own in-process server. Damaged snapshots are loaded in this process:
`load` checks every blob before it touches the backend, so a refused snapshot leaves the session's server alone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from dermaops import s3_snapshot
from dermaops.embedded_s3 import free_port

BUCKET = "dermaops"
MIB = 1024 * 1024
CHAMPION = "registry/ham10000/champion.json"
BIG = "datasets/ham10000/v1/HAM10000_images_part_1.zip"
MARKED = "runs/r1/validation/dq_report.md"


@contextmanager
def embedded_s3(state_dir: Path, workdir: Path):
    """`python -m dermaops.embedded_s3 --state-dir state_dir` until the block ends, then SIGTERM (it saves)."""
    env_file = workdir / f"s3-env-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "dermaops.embedded_s3", "--port", str(free_port()), "--bucket", BUCKET]
    cmd += ["--env-file", str(env_file), "--state-dir", str(state_dir)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "embedded S3 did not become ready in 60 s"
            time.sleep(0.05)
        env = json.loads(env_file.read_text())
        yield boto3.client(
            "s3",
            endpoint_url=env["DERMAOPS_S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr


def described(s3, key: str) -> dict:
    head = s3.head_object(Bucket=BUCKET, Key=key)
    body = s3.get_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")["Body"].read()
    return {"body": body, **{k: head.get(k) for k in ("ETag", "ContentType", "Metadata", "ContentLength")}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state dir saved by a server that held a multipart object, an object with metadata and champion.json;
    and what a client saw of them before the restart."""
    work = tmp_path_factory.mktemp("s3-snapshot")
    state = work / "state"
    big = os.urandom(11 * MIB)  # 3 parts of 5 MiB at most: ETag "<md5>-3"
    with embedded_s3(state, work) as s3:
        s3.upload_fileobj(
            io.BytesIO(big),
            BUCKET,
            BIG,
            ExtraArgs={"ContentType": "application/zip"},
            Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB),
        )
        s3.put_object(
            Bucket=BUCKET,
            Key=MARKED,
            Body=b"# data quality\n",
            ContentType="text/markdown; charset=utf-8",
            Metadata={"dermaops-run": "r1", "stage": "validate"},
        )
        s3.put_object(Bucket=BUCKET, Key=CHAMPION, Body=b'{"run_id": "r1"}', ContentType="application/json")
        before = {key: described(s3, key) for key in (BIG, MARKED, CHAMPION)}
    assert before[BIG]["ETag"].endswith('-3"'), before[BIG]["ETag"]
    assert before[BIG]["body"] == big
    return state, work, before


def test_objects_survive_a_restart(saved):
    state, work, before = saved
    with embedded_s3(state, work) as s3:
        after = {key: described(s3, key) for key in before}
        # The bucket holds exactly what it held: nothing lost, nothing extra.
        listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
        assert sorted(o["Key"] for o in listed) == sorted(before)
    assert after == before


def test_a_conditional_write_on_the_old_etag_holds_after_a_restart(saved, tmp_path):
    state, work, before = saved
    state = shutil.copytree(state, tmp_path / "state", symlinks=True)
    with embedded_s3(state, work) as s3:
        with pytest.raises(ClientError) as refused:
            s3.put_object(Bucket=BUCKET, Key=CHAMPION, Body=b"{}", IfMatch='"0123456789abcdef0123456789abcdef"')
        assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
        written = s3.put_object(Bucket=BUCKET, Key=CHAMPION, Body=b'{"run_id": "r2"}', IfMatch=before[CHAMPION]["ETag"])
        # And the multipart object's "md5-N" ETag, which re-putting its bytes would not give back.
        s3.put_object(Bucket=BUCKET, Key=BIG, Body=b"replaced", IfMatch=before[BIG]["ETag"])
    # The second life's writes were saved too.
    with embedded_s3(state, work) as s3:
        assert s3.get_object(Bucket=BUCKET, Key=CHAMPION)["Body"].read() == b'{"run_id": "r2"}'
        assert s3.head_object(Bucket=BUCKET, Key=CHAMPION)["ETag"] == written["ETag"]
        assert s3.get_object(Bucket=BUCKET, Key=BIG)["Body"].read() == b"replaced"


def test_a_save_replaces_the_snapshot_atomically_and_sweeps_leftovers(saved, tmp_path):
    state, work, before = saved
    state = shutil.copytree(state, tmp_path / "state", symlinks=True)
    live = (state / s3_snapshot.CURRENT).read_text().strip()
    inodes = {b.stat().st_ino for b in (state / live / s3_snapshot.BLOBS).iterdir()}
    # What a save killed half-way leaves (a temporary folder), an older snapshot, and a file not ours.
    (state / ".tmp-snapshot-20000101T000000.000000Z-1" / "blobs").mkdir(parents=True)
    (state / "snapshot-20000101T000000.000000Z-1").mkdir()
    (state / "not-ours.txt").write_text("kept")
    with embedded_s3(state, work) as s3:
        assert described(s3, MARKED) == before[MARKED]
    entries = sorted(p.name for p in state.iterdir())
    assert len(entries) == 3 and entries[0] == s3_snapshot.CURRENT and entries[1] == "not-ours.txt", entries
    assert entries[2].startswith(s3_snapshot.PREFIX) and entries[2] != live
    # Nothing changed in between: the new snapshot's blobs are the previous one's files, hard-linked, not copies.
    assert {b.stat().st_ino for b in (state / entries[2] / s3_snapshot.BLOBS).iterdir()} == inodes


def test_a_missing_or_empty_state_dir_loads_nothing(tmp_path):
    assert s3_snapshot.load(tmp_path / "missing") == 0
    assert s3_snapshot.load(tmp_path) == 0


def damaged_copy(saved, tmp_path: Path) -> tuple[Path, Path, dict]:
    state = shutil.copytree(saved[0], tmp_path / "state", symlinks=True)
    live = state / (state / s3_snapshot.CURRENT).read_text().strip()
    return state, live, json.loads((live / s3_snapshot.INDEX).read_text())


def test_a_damaged_blob_fails_in_one_line_naming_it_and_loads_nothing(saved, tmp_path):
    state, live, index = damaged_copy(saved, tmp_path)
    [record] = [o for b in index["buckets"] for o in b["objects"] if o["key"] == MARKED]
    blob = live / record["blob"]
    blob.write_bytes(b"# data quality, rewritten\n")
    with pytest.raises(s3_snapshot.SnapshotError) as failed:
        s3_snapshot.load(state)
    message = str(failed.value)
    assert "\n" not in message and str(blob) in message and "damaged" in message, message


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda state, live: (live / "index.json").write_text("{not json"), "unreadable S3 snapshot index"),
        (lambda state, live: (live / "index.json").write_text('{"format": "x"}'), "is not a dermaops-s3-snapshot/1"),
        (lambda state, live: (live / "blobs" / "00000000").unlink(), "cannot read S3 snapshot blob"),
        (lambda state, live: shutil.rmtree(live), "names no snapshot folder"),
    ],
    ids=["index-not-json", "index-other-format", "blob-missing", "snapshot-folder-missing"],
)
def test_a_damaged_snapshot_fails_in_one_line(saved, tmp_path, damage, expected):
    state, live, _ = damaged_copy(saved, tmp_path)
    damage(state, live)
    with pytest.raises(s3_snapshot.SnapshotError) as failed:
        s3_snapshot.load(state)
    message = str(failed.value)
    assert "\n" not in message and expected in message and str(state) in message, message
