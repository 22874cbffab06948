"""S3 on loopback: one moto server for the session, a fresh bucket per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from dermaops import access
from dermaops.embedded_s3 import EmbeddedS3
from dermaops.store import ArtifactStore, S3Uri, make_client


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


@dataclass
class LeastPrivilegeS3:
    """`python -m dermaops.embedded_s3 --least-privilege` in a process of its own (moto's IAM checks are
    process-wide, and the session server above accepts any key): an admin key, and one key per role of
    dermaops.access, each allowed to write only its prefixes."""

    env: dict[str, str]  # the client environment: the admin key as AWS_*, each role's AIRFLOW_CONN_*

    @property
    def bucket(self) -> S3Uri:
        return S3Uri(self.env["DERMAOPS_BUCKET"], "")

    def role_env(self, role: str) -> dict[str, str]:
        """A stage's S3 environment with only its role's key, as the Airflow runner hands it."""
        conn = json.loads(self.env[access.conn_env(role)])
        return {
            "AWS_ACCESS_KEY_ID": conn["login"],
            "AWS_SECRET_ACCESS_KEY": conn["password"],
            "AWS_DEFAULT_REGION": conn["extra"]["region_name"],
            "DERMAOPS_S3_ENDPOINT_URL": conn["extra"]["endpoint_url"],
        }

    def store(self, role: str | None = None) -> ArtifactStore:
        """A store with the admin key, or with a role's."""
        return ArtifactStore(make_client(self.env if role is None else self.role_env(role)))


@pytest.fixture
def least_privilege_s3(tmp_path):
    """A fresh server per test (about 1 s to start): its bucket is the deployment's, `dermaops`."""
    env_file = tmp_path / "lp-s3-env.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dermaops.embedded_s3", "--least-privilege", "--env-file", str(env_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert proc.poll() is None, f"the least-privilege S3 exited: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the least-privilege S3 did not start in 60 s"
            time.sleep(0.1)
        yield LeastPrivilegeS3(json.loads(env_file.read_text()))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
