"""S3 on loopback: one moto server for the session, a fresh bucket per test."""

from __future__ import annotations

import os
import uuid

import pytest
from dermaops.embedded_s3 import EmbeddedS3
from dermaops.store import ArtifactStore, S3Uri


@pytest.fixture(scope="session")
def s3_server():
    with EmbeddedS3() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        yield server
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def store(s3_server) -> ArtifactStore:
    return ArtifactStore()


@pytest.fixture
def bucket(store) -> S3Uri:
    """A fresh, empty bucket for this test, as an s3:// root."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(name)
    return S3Uri(name, "")


@pytest.fixture
def stage_env(s3_server) -> dict[str, str]:
    """Environment for running a stage as a subprocess against the loopback S3."""
    return {**os.environ, **s3_server.env}
