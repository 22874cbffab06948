"""What `scripts/stack` does besides starting containers: the env file it writes (`scripts/stack env`, what
`up` writes) and the upload behind `scripts/stack seed` (python -m dermaops.seed) against the loopback S3.
The whole `seed` (upload with the stages' key, the Airflow Variable, the scheduled run that ingests it)
runs in tests/test_deployment.py."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from dermaops import access

from tests.support.airflow_env import ROOT
from tests.support.stack import read_env_file

STACK = str(ROOT / "scripts" / "stack")


def test_the_env_file_has_fresh_secrets_long_enough_for_their_use(tmp_path):
    env_file = tmp_path / ".env"
    run = subprocess.run(
        [STACK, "env"], env={**os.environ, "DERMAOPS_ENV_FILE": str(env_file)}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(env_file)
    env = read_env_file(env_file)
    assert "change-me" not in env.values()
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    # The API's secret key signs HS512 tokens: PyJWT warns below 64 bytes for SHA-512.
    assert len(env["AIRFLOW__API__SECRET_KEY"]) == len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) == 64
    for role in access.ROLES:
        assert 8 <= len(env[access.secret_env(role)]) <= 40  # MinIO's limits for a user's secret
    # Never overwritten: a second call keeps the secrets the running stack uses.
    again = subprocess.run(
        [STACK, "env"], env={**os.environ, "DERMAOPS_ENV_FILE": str(env_file)}, capture_output=True, text=True
    )
    assert again.returncode == 0 and read_env_file(env_file) == env


def test_the_env_file_keeps_comments_and_replaces_only_what_is_to_be_generated():
    from dermaops.stack_env import render

    example = "# a comment=change-me\nAIRFLOW__CORE__FERNET_KEY=\nDOCKER_GID=999\nKEEP=as-is\nX_PASSWORD=change-me\n\n"
    lines = render(example, "133").splitlines()
    assert lines[0] == "# a comment=change-me" and lines[3] == "KEEP=as-is" and lines[5] == ""
    fernet = lines[1].split("=", 1)[1]
    assert len(base64.urlsafe_b64decode(fernet)) == 32  # what cryptography's Fernet accepts
    assert lines[2] == "DOCKER_GID=133"
    password = lines[4].split("=", 1)[1]
    assert password != "change-me" and len(password) == 32  # 24 random bytes, urlsafe base64
    assert render(example, "133") != render(example, "133")  # fresh secrets on every call


def _seed(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermaops.seed", *args], env=env, capture_output=True, text=True)


def test_seed_uploads_a_pack_and_prints_the_source(small_pack, s3_server, store, bucket):
    dest = bucket.join("sources", small_pack.name)
    run = _seed(str(small_pack), str(dest), env={**os.environ, **s3_server.env})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(dest)  # the source to ingest
    uploaded = {uri.key.rsplit("/", 1)[1]: size for uri, size in store.list(dest)}
    assert uploaded == {p.name: p.stat().st_size for p in small_pack.iterdir()}
    assert f"seed: {len(uploaded)} files of {small_pack}" in run.stderr


@pytest.mark.parametrize(
    ("remove", "said"),
    [("HAM10000_images_part_2.zip", "it lacks HAM10000_images_part_2.zip"), (None, "is not a folder")],
)
def test_seed_refuses_a_folder_that_is_not_a_pack_before_writing(
    remove, said, small_pack, tmp_path, s3_server, store, bucket
):
    if remove:
        pack = tmp_path / "pack"
        pack.mkdir()
        for path in small_pack.iterdir():
            if path.name != remove:
                (pack / path.name).write_bytes(path.read_bytes())
    else:
        pack = tmp_path / "missing"
    run = _seed(str(pack), str(bucket.join("sources", "x")), env={**os.environ, **s3_server.env})
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("seed: error: ") and said in line and str(pack) in line
    assert list(store.list(bucket)) == []  # nothing was written
