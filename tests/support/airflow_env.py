"""An isolated Airflow for tests: AIRFLOW_HOME in a temporary directory, SQLite metadata database
(`airflow db migrate` once per session), dags/ and plugins/ of this repository, no example DAGs.

`airflow_env.run(...)` runs the real `airflow` CLI as a subprocess. What a run did (its state, its tasks'
states and tries, XComs, asset events) is read through Airflow's REST API v2, as a user or the UI reads it,
never from the metadata tables: their layout is Airflow's to change between releases. `airflow dags test`
runs without an API server, so the session starts one over the same database, read-only (viewer role);
the CLI has no command for XComs, asset events or try numbers, and each CLI call costs seconds.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from dermaops.embedded_s3 import free_port

ROOT = Path(__file__).resolve().parents[2]
# Airflow puts the plugins folder on sys.path; tests that use the runner's helpers do the same.
if str(ROOT / "plugins") not in sys.path:
    sys.path.append(str(ROOT / "plugins"))
AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG_ID = "dermaops_ham10000"
READER = "dermaops-reader"


class AirflowApi:
    """The REST API v2 of an API server (its process, already started) as the user `user`."""

    def __init__(self, base: str, user: str, password: str, proc: subprocess.Popen, log: Path):
        self.base, self.user, self.password, self.proc, self.log = base, user, password, proc, log
        self.session: requests.Session | None = None

    def _connect(self, timeout: float = 240) -> requests.Session:
        # The server boots while the first test's DAG runs; on a loaded 2-core machine that can take a minute.
        deadline = time.monotonic() + timeout
        credentials = {"username": self.user, "password": self.password}
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"airflow api-server exited {self.proc.returncode}:\n{self._log_tail()}")
            try:
                response = requests.post(f"{self.base}/auth/token", json=credentials, timeout=10)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise AssertionError(f"airflow api-server not answering:\n{self._log_tail()}") from None
                time.sleep(1)
        assert response.status_code == 201, response.text
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return session

    def _log_tail(self) -> str:
        return self.log.read_text()[-4000:]

    def get(self, path: str, **params) -> dict:
        """GET /api/v2/`path` (its parts already quoted); the JSON body of a 200 answer."""
        if self.session is None:
            self.session = self._connect()
        response = self.session.get(f"{self.base}/api/v2/{path}", params=params, timeout=60)
        assert response.status_code == 200, f"GET {path} {params}: {response.status_code} {response.text[:2000]}"
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _run_path(dag_id: str, run_id: str) -> str:
    # Run ids carry ':' and '+' (manual__2026-01-05T10:00:00+00:00): one path segment each, quoted whole.
    return f"dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"


@dataclass
class AirflowEnv:
    home: Path
    env: dict[str, str]
    api: AirflowApi

    def run(self, *args: str, env: dict | None = None, timeout: float = 900, check: bool = True):
        proc = subprocess.run(
            [AIRFLOW, *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
            cwd=self.home,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
        return proc

    def latest_run_id(self, dag_id: str = DAG_ID) -> str:
        runs = self.api.get(f"dags/{quote(dag_id, safe='')}/dagRuns", order_by="-id", limit=1)["dag_runs"]
        assert runs, f"no run of {dag_id} was recorded"
        return runs[0]["dag_run_id"]

    def run_state(self, run_id: str, dag_id: str = DAG_ID) -> str:
        return self.api.get(_run_path(dag_id, run_id))["state"]

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, dict]:
        """task_id -> the run's task instance as the API gives it (state, try_number, duration, ...)."""
        body = self.api.get(f"{_run_path(dag_id, run_id)}/taskInstances", limit=100)
        tis = body["task_instances"]
        assert body["total_entries"] == len(tis), body["total_entries"]
        by_task = {ti["task_id"]: ti for ti in tis}
        assert len(by_task) == len(tis), "a mapped task: key its instances by map_index too"
        return by_task

    def task_states(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, str | None]:
        return {task_id: ti["state"] for task_id, ti in self.task_instances(run_id, dag_id).items()}

    def xcoms(self, run_id: str, key: str = "return_value", dag_id: str = DAG_ID) -> dict[str, object]:
        """task_id -> the value each task of the run pushed under `key`: the run's entries listed in one call
        (the list has no values), then each entry's value."""
        run = _run_path(dag_id, run_id)
        body = self.api.get(f"{run}/taskInstances/~/xcomEntries", xcom_key=key, limit=100)
        entries = body["xcom_entries"]
        assert body["total_entries"] == len(entries), body["total_entries"]
        values = {}
        for entry in entries:
            path = f"{run}/taskInstances/{quote(entry['task_id'], safe='')}/xcomEntries/{quote(key, safe='')}"
            values[entry["task_id"]] = self.api.get(path, map_index=entry["map_index"])["value"]
        return values

    def asset_events(self, run_id: str, dag_id: str = DAG_ID) -> list[dict]:
        """The asset events the run emitted, as the API gives them (name, uri, extra, source_task_id, ...)."""
        body = self.api.get("assets/events", source_dag_id=dag_id, source_run_id=run_id, limit=100)
        assert body["total_entries"] == len(body["asset_events"]), body["total_entries"]
        return body["asset_events"]


def airflow_base_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }


def api_server_env(home: Path, user: str, password: str, role: str) -> tuple[dict[str, str], int]:
    """airflow_base_env plus an API server on a free loopback port whose one user (SimpleAuthManager) is
    `user` with `role`; returns (env, port)."""
    port = free_port()
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({user: password}))
    env = {
        **airflow_base_env(home),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:{role}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        # The scheduler signs task tokens that the API server checks: one shared secret.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
    }
    return env, port


def start_reader_api(home: Path) -> AirflowApi:
    """An API server over `home`'s database for reading runs: the public REST API only (no execution API,
    no UI to serve), one worker, a viewer that can change nothing."""
    password = secrets.token_hex(8)
    env, port = api_server_env(home, READER, password, "viewer")
    log = home / "api-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [AIRFLOW, "api-server", "--apps", "core", "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,  # stopped with everything it started
        )
    return AirflowApi(f"http://127.0.0.1:{port}", READER, password, proc, log)


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_base_env(home)
    migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, f"airflow db migrate exited {migrate.returncode}:\n{migrate.stderr[-6000:]}"
    # Started now, it boots while the first test's DAG runs; the first read waits for it.
    api = start_reader_api(home)
    try:
        yield AirflowEnv(home, env, api)
    finally:
        api.stop()
