"""docker-compose.yaml, validated and resolved by Compose v2 itself (`docker compose config`).

Compose v2 comes from Debian trixie's packages via scripts/compose-plugin; `config` needs no
running engine and pulls nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml
from dermaops import __version__, access

from tests.support.docker_engine import ROOT, run_script

COMPOSE_FILE = ROOT / "docker-compose.yaml"
OFFLINE_FILE = ROOT / "docker-compose.offline.yaml"
WORKER_FILE = ROOT / "docker-compose.worker.yaml"
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
SERVICES = {"postgres", "redis", "minio", "minio-init", *AIRFLOW_SERVICES}
# Every secret the deployment needs, and nothing else: these must come from .env.
SECRET_VARS = (
    "_AIRFLOW_WWW_USER_PASSWORD",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    *(access.secret_env(role) for role in access.ROLES),
    "SLACK_BOT_TOKEN",
)


@pytest.fixture(scope="module")
def compose():
    """compose(env_file, *args) -> CompletedProcess of `docker compose ... config --format json`."""
    run_script("compose-plugin", timeout=600)
    # Only the env file may feed the interpolation: none of the caller's variables leak in.
    env = {name: os.environ[name] for name in ("PATH", "HOME", "DOCKER_CONFIG") if name in os.environ}

    def run(env_file, *args: str, files=(COMPOSE_FILE,)) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker", "compose", *(a for f in files for a in ("-f", str(f))), "--project-directory", str(ROOT)]
            + ["--env-file", str(env_file), *args, "config", "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    return run


def resolved(compose, env_file, *args: str, files=(COMPOSE_FILE,)) -> dict:
    proc = compose(env_file, *args, files=files)
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
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@redis:6379/0"
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://airflow:")
        assert (env["DERMAOPS_DEFAULT_QUEUE"], env["DERMAOPS_GPU_QUEUE"]) == ("default", "gpu")
        assert env["DERMAOPS_RUNNER"] == "docker"
        assert env["DERMAOPS_DATA_IMAGE"] == f"dermaops-data:{__version__}"
        assert env["DERMAOPS_TORCH_IMAGE"] == f"dermaops-torch:{__version__}"
        assert env["DERMAOPS_BUCKET"] == "dermaops"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    worker = " ".join(config["services"]["airflow-worker"]["command"])
    # `config` prints the command with compose's own $$ escaping.
    assert 'airflow celery worker --queues "$$queues"' in worker
    assert "$${DERMAOPS_WORKER_QUEUES:-$${DERMAOPS_DEFAULT_QUEUE},$${DERMAOPS_GPU_QUEUE}}" in worker
    commands = {
        s: config["services"][s]["command"] for s in AIRFLOW_SERVICES if s not in ("airflow-init", "airflow-worker")
    }
    assert commands == {
        "airflow-apiserver": ["airflow", "api-server"],
        "airflow-scheduler": ["airflow", "scheduler"],
        "airflow-dag-processor": ["airflow", "dag-processor"],
        "airflow-triggerer": ["airflow", "triggerer"],
    }


def test_every_service_has_a_healthcheck(compose):
    config = resolved(
        compose, ROOT / ".env.example", "--profile", "gpu", "--profile", "gpu-worker", "--profile", "flower"
    )
    assert {"gpu-check", "airflow-worker-gpu", "flower"} <= set(config["services"])
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
    # Least privilege: each stage gets its role's key (the connection dermaops_s3_<role>), which minio-init
    # creates with that role's policy; no Airflow process holds a key of its own. MinIO's root account
    # stays with MinIO and the init service.
    assert "AWS_ACCESS_KEY_ID" not in api and "AWS_SECRET_ACCESS_KEY" not in api
    for role in access.ROLES:
        conn = json.loads(api[access.conn_env(role)])
        assert (conn["conn_type"], conn["login"]) == ("aws", access.key_id(role))
        assert conn["password"] == values[access.secret_env(role)]
        assert conn["extra"] == {"endpoint_url": "http://minio:9000", "region_name": "us-east-1"}
    for name, service in config["services"].items():
        if name not in ("minio", "minio-init"):
            assert values["MINIO_ROOT_PASSWORD"] not in json.dumps(service), name
    init = config["services"]["minio-init"]
    assert init["entrypoint"] == ["sh", "/scripts/minio-least-privilege.sh"]
    mounts = {v["source"]: v["target"] for v in init["volumes"]}
    assert mounts[str(access.POLICY_DIR)] == init["environment"]["POLICY_DIR"]  # the policies the tests enforce
    for role in access.ROLES:
        assert init["environment"][access.secret_env(role)] == values[access.secret_env(role)]
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
    mounted = {v["target"]: v["source"] for v in init["volumes"]}
    script = Path(mounted[init["entrypoint"][1]]).read_text()
    assert 'mc mb --ignore-existing "dermaops/$BUCKET"' in script and "mc admin user add" in script
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


def published(spec: dict) -> list[tuple[str, str]]:
    return [(p.get("host_ip", ""), str(p["target"])) for p in spec.get("ports") or []]


@pytest.mark.parametrize("offline", [False, True])
def test_only_loopback_ports_are_published(compose, offline):
    files = (COMPOSE_FILE, OFFLINE_FILE) if offline else (COMPOSE_FILE,)
    profiles = ("--profile", "gpu-worker", "--profile", "flower", "--profile", "gpu")
    config = resolved(compose, ROOT / ".env.example", *profiles, files=files)
    ports = {name: published(spec) for name, spec in config["services"].items() if spec.get("ports")}
    # The UI/API, S3 (and MinIO's console online) and flower; never the database, the broker, the
    # workers' log servers (8793) or the scheduler's health server (8974).
    expected = {"airflow-apiserver", "minio", "flower"}
    assert set(ports) == expected, ports
    for name, bindings in ports.items():
        for host_ip, target in bindings:
            assert host_ip == "127.0.0.1", (name, host_ip, target)
            assert target not in ("5432", "6379", "8793", "8974"), (name, target)


def test_gpu_worker_serves_only_the_gpu_queue_and_scales(compose, tmp_path):
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text() + "DERMAOPS_GPU_QUEUE=cuda\nDERMAOPS_WORKER_QUEUES=default\n")
    config = resolved(compose, env, "--profile", "gpu-worker")
    gpu = config["services"]["airflow-worker-gpu"]
    assert env_of(config, "airflow-worker-gpu")["DERMAOPS_WORKER_QUEUES"] == "cuda"
    assert env_of(config, "airflow-worker")["DERMAOPS_WORKER_QUEUES"] == "default"
    assert env_of(config, "airflow-scheduler")["DERMAOPS_GPU_QUEUE"] == "cuda"
    assert gpu["command"] == config["services"]["airflow-worker"]["command"]
    # Scalable: no fixed container name or published port on the worker.
    for name in ("airflow-worker", "airflow-worker-gpu"):
        assert "container_name" not in config["services"][name] and not config["services"][name].get("ports")
        # Each worker answers a ping for its own node (celery@$HOSTNAME), so a scaled replica is
        # judged by itself (images/healthcheck.py).
        assert config["services"][name]["healthcheck"]["test"][-2:] == ["/opt/airflow/healthcheck.py", "celery"]


def test_offline_override_keeps_service_names_endpoint_and_credentials(compose, secret_env_file):
    path, values = secret_env_file
    online = resolved(compose, path)
    config = resolved(compose, path, files=(COMPOSE_FILE, OFFLINE_FILE))
    assert set(config["services"]) == set(online["services"])
    assert online["services"]["postgres"]["image"] == "postgres:16"
    assert config["services"]["postgres"]["image"] == f"dermaops-postgres:{__version__}"
    assert config["services"]["redis"]["image"] == f"dermaops-redis:{__version__}"
    assert config["services"]["minio"]["image"] == f"dermaops-s3:{__version__}"
    # The stand-in enforces the same per-role policies and keeps its objects across a restart.
    minio = config["services"]["minio"]
    assert minio["command"][:3] == ["python", "-m", "dermaops.embedded_s3"]
    assert {"--least-privilege", "--state-dir=/data", "--port=9000"} <= set(minio["command"])
    assert [v["target"] for v in minio["volumes"]] == ["/data"]
    assert env_of(config, "minio")["MINIO_ROOT_PASSWORD"] == values["MINIO_ROOT_PASSWORD"]
    for role in access.ROLES:
        assert env_of(config, "minio")[access.secret_env(role)] == values[access.secret_env(role)]
    init = config["services"]["minio-init"]
    assert init["environment"]["AWS_SECRET_ACCESS_KEY"] == values["MINIO_ROOT_PASSWORD"]
    assert init["environment"]["DERMAOPS_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "ensure_bucket" in " ".join(init["command"])
    for service in AIRFLOW_SERVICES:
        assert env_of(config, service) == env_of(online, service)


def test_worker_on_another_host_joins_through_broker_and_database(compose, secret_env_file):
    path, values = secret_env_file
    with path.open("a") as f:
        f.write("DERMAOPS_HUB=10.0.0.5\nDERMAOPS_WORKER_HOSTNAME=gpu-box\nDERMAOPS_WORKER_LOG_BIND=10.0.0.6\n")
    config = resolved(compose, path, files=(WORKER_FILE,))
    assert set(config["services"]) == {"airflow-worker"}
    worker = config["services"]["airflow-worker"]
    env = worker["environment"]
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@10.0.0.5:6379/0"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith(f":{values['POSTGRES_PASSWORD']}@10.0.0.5/airflow")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://10.0.0.5:8080/execution/"
    assert env["DERMAOPS_S3_ENDPOINT_URL"] == "http://10.0.0.5:9000"
    # Only the keys of the gpu queue's stages: no key that writes datasets/ on the GPU host.
    roles = {name for name in env if name.startswith("AIRFLOW_CONN_DERMAOPS_S3_")}
    assert roles == {access.conn_env(role) for role in ("train", "registry", "predict")}
    assert json.loads(env[access.conn_env("train")])["extra"]["endpoint_url"] == "http://10.0.0.5:9000"
    assert (env["DERMAOPS_WORKER_QUEUES"], env["DERMAOPS_GPU"]) == ("gpu", "1")
    assert worker["hostname"] == "gpu-box"
    assert published(worker) == [("10.0.0.6", "8793")]
    sockets = [v for v in worker["volumes"] if v.get("target") == "/var/run/docker.sock"]
    assert sockets, "the remote worker runs its stages on its own Docker engine"
