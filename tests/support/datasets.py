"""Published dataset versions made by the real `ingest` stage from the real packs.

Session-scoped: ingesting the 28 px pack once serves every test that only reads it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from dermaops.store import ArtifactStore


def _ingest(source, bucket: str, env: dict, scratch) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dermaops",
            "ingest",
            "--source",
            str(source),
            "--datasets",
            f"s3://{bucket}/datasets/ham10000",
        ],
        capture_output=True,
        text=True,
        env={**env, "DERMAOPS_SCRATCH_DIR": str(scratch)},
        timeout=600,
    )
    assert proc.returncode == 0, f"ingest failed:\n{proc.stderr[-4000:]}"
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def shared_bucket(s3_server) -> str:
    """A bucket shared by the whole session for read-only inputs (datasets)."""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    ArtifactStore().ensure_bucket(name)
    return name


@pytest.fixture(scope="session")
def dataset_28px(s3_server, shared_bucket, pack_28px, tmp_path_factory) -> dict:
    """The ingest summary of the real 28 px pack (all 10,015 images): has dataset_uri, dataset_version."""
    return _ingest(pack_28px, shared_bucket, {**os.environ, **s3_server.env}, tmp_path_factory.mktemp("ingest28"))


@pytest.fixture(scope="session")
def dataset_200px(s3_server, shared_bucket, pack_200px, tmp_path_factory) -> dict:
    """The ingest summary of the real 200x150 pack (all 10,015 images and their lesion masks)."""
    return _ingest(pack_200px, shared_bucket, {**os.environ, **s3_server.env}, tmp_path_factory.mktemp("ingest200"))


@pytest.fixture(scope="session")
def dataset_sample(s3_server, shared_bucket, pack_sample, tmp_path_factory) -> dict:
    """The ingest summary of the 70-image full-resolution sample pack."""
    return _ingest(pack_sample, shared_bucket, {**os.environ, **s3_server.env}, tmp_path_factory.mktemp("ingestsample"))
