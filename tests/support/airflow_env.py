"""An isolated Airflow for tests: AIRFLOW_HOME in a temporary directory, SQLite metadata database
(`airflow db migrate` once per session), dags/ and plugins/ of this repository, no example DAGs.

`airflow_env.run(...)` runs the real `airflow` CLI as a subprocess; `airflow_env.db()` reads the
metadata database (task states, XComs) to check what a run did.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from dermaops.embedded_s3 import free_port

ROOT = Path(__file__).resolve().parents[2]
# Airflow puts the plugins folder on sys.path; tests that use the runner's helpers do the same.
if str(ROOT / "plugins") not in sys.path:
    sys.path.append(str(ROOT / "plugins"))
AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG_ID = "dermaops_ham10000"


@dataclass
class AirflowEnv:
    home: Path
    env: dict[str, str]

    @property
    def db_path(self) -> Path:
        return self.home / "airflow.db"

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

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        return conn

    def latest_run_id(self, dag_id: str = DAG_ID) -> str:
        with self.db() as conn:
            row = conn.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,))
            return row.fetchone()["run_id"]

    def run_state(self, run_id: str, dag_id: str = DAG_ID) -> str:
        with self.db() as conn:
            row = conn.execute("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
            return row.fetchone()["state"]

    def task_states(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, str | None]:
        with self.db() as conn:
            rows = conn.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
            )
            return {r["task_id"]: r["state"] for r in rows}

    def xcoms(self, run_id: str, key: str = "return_value", dag_id: str = DAG_ID) -> dict[str, object]:
        with self.db() as conn:
            rows = conn.execute(
                "SELECT task_id, value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = ?", (dag_id, run_id, key)
            )
            return {r["task_id"]: json.loads(r["value"]) for r in rows}


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


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> AirflowEnv:
    home = tmp_path_factory.mktemp("airflow-home")
    env = AirflowEnv(home, airflow_base_env(home))
    env.run("db", "migrate", timeout=600)
    return env
