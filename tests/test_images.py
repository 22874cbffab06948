"""The container images, built offline by scripts/build-images and run for real.

The first run on a machine builds them (minutes: the torch image holds ~5 GB of CUDA wheels);
later runs find them up to date by their inputs' hash and only run the checks.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest
from dermaops import __version__

from tests.support.docker_engine import ROOT, docker

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

STAGE_IMAGES = ("data", "torch")
# Names that must never appear in an image's environment or build history with a value.
SECRET_PATTERN = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|FERNET)[A-Z_]*=\S", re.IGNORECASE)


@pytest.fixture(scope="module")
def images(build_images) -> dict[str, str]:
    return build_images(*STAGE_IMAGES, "airflow")


def inspect(tag: str) -> dict:
    return json.loads(docker("image", "inspect", tag).stdout)[0]


def run_in(tag: str, *argv: str, docker_args: tuple[str, ...] = (), timeout: float = 300):
    return docker("run", "--rm", *docker_args, tag, *argv, timeout=timeout)


def test_tags_carry_the_package_version(images):
    for name, tag in images.items():
        assert tag == f"dermaops-{name}:{__version__}"
        labels = inspect(tag)["Config"]["Labels"]
        assert labels["org.opencontainers.image.version"] == __version__
        assert re.fullmatch(r"[0-9a-f]{64}", labels["dermaops.inputs-sha256"])


@pytest.mark.parametrize("name", STAGE_IMAGES)
def test_stage_image_runs_as_non_root_with_the_stage_cli(images, name):
    tag = images[name]
    config = inspect(tag)["Config"]
    assert config["User"] == "dermaops"
    assert not config.get("Entrypoint"), "DockerOperator's command must be the whole `python -m dermaops ...`"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["DERMAOPS_EXPECTATIONS_DIR"] == "/opt/dermaops/expectations"
    assert run_in(tag, "id", "-u").stdout.strip() == "1000"

    proc = run_in(tag, "python", "-m", "dermaops", "--help")
    for stage in ("ingest", "validate", "split", "train_baseline", "train", "evaluate", "notify"):
        assert stage in proc.stdout
    # The expectation suites the validate stage reads are where the environment says.
    listing = run_in(tag, "sh", "-c", 'ls "$DERMAOPS_EXPECTATIONS_DIR"').stdout.split()
    assert sorted(listing) == sorted(p.name for p in (ROOT / "expectations").iterdir())


def test_torch_image_has_cuda_torch_and_torchvision(images):
    proc = run_in(
        images["torch"],
        "python",
        "-c",
        "import json, os, torch, torchvision; print(json.dumps({'torch': torch.__version__, "
        "'torchvision': torchvision.__version__, 'cuda': torch.version.cuda, 'home': os.environ['TORCH_HOME']}))",
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["torch"].startswith("2.14.1")
    assert info["torchvision"].startswith("0.29.1")
    assert info["cuda"], "the torch image must carry the CUDA build of torch"
    assert info["home"] == "/opt/torch"


def test_airflow_image_parses_the_project_dags(images):
    tag = images["airflow"]
    assert run_in(tag, "airflow", "version").stdout.strip().endswith("3.3.2")
    proc = run_in(
        tag,
        "python",
        "-c",
        "import json, psycopg2, asyncpg\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag('/opt/airflow/dags')\n"
        "print(json.dumps({'dags': sorted(bag.dag_ids), 'errors': {k: str(v) for k, v in bag.import_errors.items()}}))",
        timeout=600,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"], "no DAG found in the image's /opt/airflow/dags"
    assert inspect(tag)["Config"]["User"] == "50000:0"


@pytest.mark.parametrize("name", [*STAGE_IMAGES, "airflow"])
def test_no_secret_or_build_source_is_baked_in(images, name):
    tag = images[name]
    env = inspect(tag)["Config"]["Env"]
    assert not [e for e in env if SECRET_PATTERN.search(e)], env
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
    assert not SECRET_PATTERN.search(history)
    # The loopback wheelhouse was an argument of the builder stage only.
    assert "PIP_SOURCE" not in history and "127.0.0.1" not in history
    # No wheel of the wheelhouse or pip cache travelled into the image (Debian's venv keeps its own
    # bundled pip/setuptools wheels in /usr/share/python-wheels: those belong to the base).
    find = "find / -xdev \\( -name '*.whl' -o -path '*/.cache/pip' \\) ! -path '/usr/share/python-wheels/*' -print"
    leftovers = run_in(tag, "sh", "-c", f"{find} 2>/dev/null | head -5")
    assert leftovers.stdout.strip() == ""


def test_second_build_is_skipped_by_the_inputs_hash(images):
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-images"), "data", "torch"], capture_output=True, text=True, timeout=600
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [images["data"], images["torch"]]
    assert "dermaops-data:" in proc.stderr and "is up to date" in proc.stderr
    assert "building" not in proc.stderr
    assert elapsed < 60, f"an up-to-date build took {elapsed:.0f}s"


def test_docker_engine_script_is_idempotent(docker_engine):
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "scripts" / "docker-engine")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 10, "a running engine must be found, not started again"
    assert docker("info", "--format", "{{.ServerVersion}}").stdout.strip() == docker_engine


def test_build_script_rejects_an_unknown_image():
    proc = subprocess.run([str(ROOT / "scripts" / "build-images"), "gpu"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown image 'gpu'" in proc.stderr and "data, torch, airflow" in proc.stderr


def test_data_image_runs_ingest_against_loopback_s3(images, s3_server, store, bucket, pack_sample):
    # The real pack goes to S3 first: the container ingests from an s3:// source into a dataset version.
    source = bucket.join("incoming", uuid.uuid4().hex[:8])
    for path in sorted(pack_sample.iterdir()):
        if path.name.startswith("HAM10000_"):
            store.put_file(source.join(path.name), path)
    datasets = bucket.join("datasets", "ham10000")
    env_args = [arg for name, value in s3_server.env.items() for arg in ("-e", f"{name}={value}")]
    proc = run_in(
        images["data"],
        "python",
        "-m",
        "dermaops",
        "ingest",
        "--source",
        str(source),
        "--datasets",
        str(datasets),
        # Host network: the container reaches the loopback S3 at 127.0.0.1 like any local process.
        docker_args=("--network", "host", *env_args),
        timeout=600,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "ingest" and summary["status"] == "done"
    assert summary["n_images"] == 70 and summary["n_rows"] == 70
    assert summary["dataset_uri"].startswith(f"{datasets}/")
    manifest = store.get_json(f"{summary['dataset_uri']}/manifest.json")
    assert manifest["dataset_version"] == summary["dataset_version"]
    assert set(manifest["files"]) >= {"HAM10000_metadata.csv", "HAM10000_images_part_1.zip"}


@pytest.fixture(scope="module")
def service_images() -> dict[str, str]:
    # Not through build_images (the stage/airflow fixture): these come from the services base.
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-images"), "postgres", "redis", "s3"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    tags = proc.stdout.split()
    assert tags == [f"dermaops-{n}:{__version__}" for n in ("postgres", "redis", "data", "s3")], tags
    return dict(zip(("postgres", "redis", "data", "s3"), tags, strict=True))


def wait_healthy_cmd(container: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + timeout
    while True:
        proc = docker("exec", container, *cmd, check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc
        time.sleep(1)


def test_postgres_image_from_debian_packages_keeps_the_official_interface(service_images):
    tag = service_images["postgres"]
    assert run_in(tag, "sh", "-c", "dpkg-query -W -f '${Status}' postgresql").stdout == "install ok installed"
    name = f"dermaops-pg-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    docker(
        "run",
        "-d",
        "--name",
        name,
        "-e",
        "POSTGRES_USER=airflow",
        "-e",
        f"POSTGRES_PASSWORD={password}",
        "-e",
        "POSTGRES_DB=airflow",
        tag,
    )
    try:
        assert wait_healthy_cmd(name, "pg_isready", "-U", "airflow").returncode == 0
        ip = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()
        # Over the network: the password is required (scram), and the database exists.
        sql = ["psql", "-h", ip, "-U", "airflow", "-d", "airflow", "-tAc", "select current_database()"]
        ok = docker("exec", "-e", f"PGPASSWORD={password}", name, *sql, check=False)
        assert ok.stdout.strip() == "airflow", ok.stderr
        refused = docker("exec", "-e", "PGPASSWORD=wrong", name, *sql, check=False)
        assert refused.returncode != 0 and "password authentication failed" in refused.stderr
        assert "initialised" in docker("logs", name).stdout
    finally:
        docker("rm", "-fv", name, check=False)


def test_redis_image_from_debian_packages_answers_ping(service_images):
    tag = service_images["redis"]
    name = f"dermaops-redis-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, tag)
    try:
        assert wait_healthy_cmd(name, "redis-cli", "ping").stdout.strip() == "PONG"
        assert docker("exec", name, "id", "-un").stdout.strip() == "redis"
    finally:
        docker("rm", "-fv", name, check=False)


def test_s3_stand_in_image_serves_the_embedded_s3(service_images):
    proc = run_in(
        service_images["s3"],
        "python",
        "-c",
        "from dermaops.embedded_s3 import EmbeddedS3\n"
        "from dermaops.store import ArtifactStore\n"
        "import os\n"
        "s = EmbeddedS3(host='0.0.0.0').start()\n"
        "os.environ.update(s.env)\n"
        "ArtifactStore().ensure_bucket('dermaops')\n"
        "print('ok')\n"
        "s.stop()",
    )
    assert proc.stdout.strip().splitlines()[-1] == "ok"


def test_a_stopped_stage_task_removes_its_container_within_the_supervisors_grace(images):
    """An operator marks a run failed: Airflow's task supervisor sends SIGTERM (the operator's on_kill)
    and SIGKILLs the task process 5 s later. The stage container must be gone by then: the provider's
    own on_kill first waits out a 10 s stop, so a run marked failed left its container behind."""
    import threading

    from dermaops_runner.containers import labels
    from dermaops_runner.docker_mode import DockerStageOperator
    from dermaops_runner.stages import spec_for

    spec = spec_for("ingest")
    operator = DockerStageOperator(task_id="ingest", spec=spec, argv=[], secrets=())
    cli = operator.cli
    key = f"on-kill-{uuid.uuid4().hex[:8]}"
    operator.container = cli.create_container(
        image=images["data"], command=["sleep", "600"], labels=labels("ingest", key)
    )
    cli.start(operator.container)
    try:
        stopping = threading.Thread(target=operator.on_kill, daemon=True)
        stopping.start()
        stopping.join(5.0)  # the supervisor's escalation delay (airflow.sdk supervisor, kill())
        assert cli.containers(all=True, filters={"label": f"dermaops.task-instance={key}"}) == []
    finally:
        docker("rm", "-f", operator.container["Id"], check=False)
