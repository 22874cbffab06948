"""docker-compose.yaml, validated and resolved by Compose v2 itself (`docker compose config`).

Compose v2 comes from Debian trixie's packages via scripts/compose-plugin; `config` needs no
running engine and pulls nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest
import yaml
from dermaops import __version__

from tests.support.docker_engine import ROOT, run_script

COMPOSE_FILE = ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
SERVICES = {"postgres", "minio", "minio-init", *AIRFLOW_SERVICES}
# Every secret the deployment needs, and nothing else: these must come from .env.
SECRET_VARS = (
    "_AIRFLOW_WWW_USER_PASSWORD",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "SLACK_BOT_TOKEN",
)


@pytest.fixture(scope="module")
def compose():
    """compose(env_file, *args) -> CompletedProcess of `docker compose ... config --format json`."""
    run_script("compose-plugin", timeout=600)
    # Only the env file may feed the interpolation: none of the caller's variables leak in.
    env = {name: os.environ[name] for name in ("PATH", "HOME", "DOCKER_CONFIG") if name in os.environ}

    def run(env_file, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
            + ["--env-file", str(env_file), *args, "config", "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    return run


def resolved(compose, env_file, *args: str) -> dict:
    proc = compose(env_file, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def secret_env_file(tmp_path) -> tuple:
    """.env.example with every secret replaced by a fresh random value -> (path, {name: value})."""
    values = {name: f"{name.lower()}-{secrets.token_hex(8)}" for name in SECRET_VARS}
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values[name]}" if name in values else line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path, values


def env_of(config: dict, service: str) -> dict:
    return config["services"][service]["environment"]


def test_env_example_validates_and_defines_the_deployment(compose):
    config = resolved(compose, ROOT / ".env.example")
    assert set(config["services"]) == SERVICES
    for service in AIRFLOW_SERVICES:
        spec = config["services"][service]
        assert spec["image"] == f"dermaops-airflow:{__version__}"
        assert spec["build"]["dockerfile"] == "images/Dockerfile.airflow"
        env = env_of(config, service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["DERMAOPS_RUNNER"] == "docker"
        assert env["DERMAOPS_DATA_IMAGE"] == f"dermaops-data:{__version__}"
        assert env["DERMAOPS_TORCH_IMAGE"] == f"dermaops-torch:{__version__}"
        assert env["DERMAOPS_BUCKET"] == "dermaops"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    commands = {s: config["services"][s]["command"] for s in AIRFLOW_SERVICES if s != "airflow-init"}
    assert commands == {
        "airflow-apiserver": ["airflow", "api-server"],
        "airflow-scheduler": ["airflow", "scheduler"],
        "airflow-dag-processor": ["airflow", "dag-processor"],
        "airflow-triggerer": ["airflow", "triggerer"],
    }


def test_every_service_has_a_healthcheck(compose):
    config = resolved(compose, ROOT / ".env.example", "--profile", "gpu")
    assert "gpu-check" in config["services"]
    for name, spec in config["services"].items():
        check = spec.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"service {name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_secrets_come_from_the_env_file(compose, secret_env_file):
    path, values = secret_env_file
    config = resolved(compose, path)
    api = env_of(config, "airflow-apiserver")
    assert api["AIRFLOW__CORE__FERNET_KEY"] == values["AIRFLOW__CORE__FERNET_KEY"]
    assert api["AIRFLOW__API__SECRET_KEY"] == values["AIRFLOW__API__SECRET_KEY"]
    assert api["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert f":{values['POSTGRES_PASSWORD']}@postgres/" in api["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert api["AWS_SECRET_ACCESS_KEY"] == values["MINIO_ROOT_PASSWORD"]
    assert api["SLACK_BOT_TOKEN"] == values["SLACK_BOT_TOKEN"]
    assert env_of(config, "postgres")["POSTGRES_PASSWORD"] == values["POSTGRES_PASSWORD"]
    assert env_of(config, "minio")["MINIO_ROOT_PASSWORD"] == values["MINIO_ROOT_PASSWORD"]
    assert env_of(config, "minio-init")["MINIO_ROOT_PASSWORD"] == values["MINIO_ROOT_PASSWORD"]
    assert env_of(config, "airflow-init")["_AIRFLOW_WWW_USER_PASSWORD"] == values["_AIRFLOW_WWW_USER_PASSWORD"]

    # The file itself holds no secret value: every secret-looking variable is an interpolation.
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    blocks = [raw["x-airflow-common"]["environment"]] + [s.get("environment") or {} for s in raw["services"].values()]
    for block in blocks:
        for name, value in block.items():
            secret_like = any(w in name for w in ("PASSWORD", "SECRET", "TOKEN", "FERNET", "ACCESS_KEY", "SQL_ALCHEMY"))
            if secret_like and not name.endswith("_FILE"):
                assert "${" in str(value), f"{name} is written into docker-compose.yaml instead of coming from .env"


def test_missing_secrets_stop_compose_with_the_variable_name(compose, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = compose(empty)
    assert proc.returncode != 0
    assert "in .env" in proc.stderr
    assert any(name in proc.stderr for name in SECRET_VARS + ("MINIO_ROOT_USER",)), proc.stderr


def test_airflow_reaches_docker_and_stage_containers_reach_minio(compose):
    config = resolved(compose, ROOT / ".env.example")
    network = env_of(config, "airflow-scheduler")["DERMAOPS_DOCKER_NETWORK"]
    assert config["networks"]["dermaops"]["name"] == network
    for service in AIRFLOW_SERVICES:
        spec = config["services"][service]
        sockets = [v for v in spec["volumes"] if v.get("target") == "/var/run/docker.sock"]
        assert sockets and sockets[0]["source"] == "/var/run/docker.sock", f"{service}: no Docker socket"
        assert "dermaops" in spec["networks"]
        assert spec["group_add"], f"{service}: not in the socket's group"
        assert env_of(config, service)["DERMAOPS_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "dermaops" in config["services"]["minio"]["networks"]


def test_minio_bucket_is_created_before_airflow_starts(compose):
    config = resolved(compose, ROOT / ".env.example")
    init = config["services"]["minio-init"]
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script and "${DERMAOPS_BUCKET}" in script
    assert init["environment"]["DERMAOPS_BUCKET"] == "dermaops"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    for service in AIRFLOW_SERVICES:
        depends = config["services"][service]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        if service != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully"


def test_gpu_profile_reserves_nvidia_devices(compose):
    config = resolved(compose, ROOT / ".env.example", "--profile", "gpu")
    check = config["services"]["gpu-check"]
    assert check["image"] == f"dermaops-torch:{__version__}"
    devices = check["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    assert env_of(resolved(compose, ROOT / ".env.example"), "airflow-scheduler")["DERMAOPS_GPU"] == "0"
