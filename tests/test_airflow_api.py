"""Airflow as users run it: API server, scheduler and dag processor (LocalExecutor, SQLite) on loopback.
The DAG is triggered through the REST API with non-default params, as the UI's trigger form does, and
the run must succeed with those params reaching the stages."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.support.airflow_env import AIRFLOW, DAG_ID, api_server_env

USER, PASSWORD = "dermaops", "trigger-form-" + secrets.token_hex(4)
# Non-default values for the knobs a user sets in the trigger form (tiny, so the run is quick).
FORM = {
    "arch": "resnet18",
    "image_size": 28,
    "epochs": 1,
    "finetune_epochs": 1,
    "batch_size": 32,
    "max_train_images": 120,
    "baseline_trees": 15,
    "seed": 7,
    "promotion_margin": 0.0,
    "mel_recall_floor": 0.0,
}


class Services:
    """Airflow's long-running processes, each in its own process group so that stopping one stops
    everything it started (task supervisors, stage subprocesses)."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = (
            subprocess.Popen(
                [AIRFLOW, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            ),
            log,
        )

    def check_alive(self) -> None:
        for name, (proc, _) in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc, log in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


@pytest.fixture
def airflow_services(tmp_path, s3_server, bucket):
    home = tmp_path / "airflow"
    home.mkdir()
    env, port = api_server_env(home, USER, PASSWORD, "admin")
    env.update(
        {
            **s3_server.env,
            "DERMAOPS_RUNNER": "local",
            "DERMAOPS_BUCKET": bucket.bucket,
            "SLACK_BOT_TOKEN": "",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            # Only the triggered run: no scheduled run may start (and queue ours behind max_active_runs=1).
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    services = Services(env, home)
    services.start("api-server", "api-server")
    services.start("scheduler", "scheduler")
    services.start("dag-processor", "dag-processor")
    try:
        yield f"http://127.0.0.1:{port}", services
    finally:
        services.stop()


def wait_for(what: str, check, services: Services, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            result = check()
        except requests.RequestException as exc:  # the API server busy on a loaded machine: poll again
            result, last = None, exc
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


def get_token(base: str) -> str | None:
    try:
        response = requests.post(f"{base}/auth/token", json={"username": USER, "password": PASSWORD}, timeout=5)
    except requests.ConnectionError:
        return None  # not listening yet
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


@pytest.mark.slow
def test_trigger_through_the_rest_api_with_form_params(airflow_services, small_pack, store, bucket):
    base, services = airflow_services
    form = {**FORM, "source": str(small_pack)}
    started = time.monotonic()
    token = wait_for("the API server", lambda: get_token(base), services, timeout=180)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    assert requests.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10).status_code == 401  # no token, no API

    def dag_parsed():
        response = api.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10)
        return response.status_code == 200 and response.json()

    dag = wait_for("the dag processor to parse the DAG", dag_parsed, services, timeout=240)
    assert dag["is_paused"] is False and dag["max_active_runs"] == 1

    # A value outside a Param's bounds is refused at trigger time, like the form does.
    refused = api.post(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"epochs": -1}})
    assert refused.status_code == 400 and "epochs" in refused.text

    response = api.post(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": form})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]

    def finished():
        run = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json()
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(f"run {run_id} to finish", finished, services, timeout=900, every=5)
    tis = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", timeout=10).json()
    states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    print(f"REST-triggered run: {run['state']} in {time.monotonic() - started:.0f} s (services included); {states}")
    assert run["state"] == "success", states
    assert set(states.values()) == {"success"} and len(states) == 9
    assert run["conf"] == form

    def xcom(task_id: str) -> dict:
        url = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return api.get(url, timeout=10).json()["value"]

    train = xcom("train")
    assert (train["arch"], train["image_size"], train["n_train"]) == ("resnet18", 28, FORM["max_train_images"])
    assert xcom("split")["seed"] == 7
    assert xcom("notify")["outcome"] == "success"
    rendered = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/train", timeout=10).json()
    argv = rendered["rendered_fields"]["argv"]
    assert "--epochs=1" in argv and "--seed=7" in argv
    # A model trained on a max_train_images subset is never promoted by default: the decision and its reason
    # are on the run (notify's XCom), and the registry keeps no champion.
    promotion = xcom("notify")["promotion"]
    assert promotion["promoted"] is False and "trained on a subset" in promotion["reason"]
    assert not store.exists(bucket.join("registry", "ham10000", "champion.json"))
