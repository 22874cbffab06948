"""The docker runner's failure path with a mocked Docker API client, in the docker provider's own test
style (`airflow.providers.docker.hooks.docker.APIClient` patched, create/attach/wait/remove mocked):
what each exit status of the stage's container does to the Airflow task."""

from __future__ import annotations

import json
import sys
from unittest import mock

import pytest

from tests.support.airflow_env import ROOT

if str(ROOT / "plugins") not in sys.path:
    sys.path.append(str(ROOT / "plugins"))

CONTAINER_ID = "c0ffee"
SECRET = "Pa55w0rd-s3cret"


class RecordingTI:
    # The identity docker mode labels its containers with (to find them again after a worker dies).
    dag_id, run_id, task_id, map_index = "dermaops_ham10000", "manual__1", "train", -1

    def __init__(self):
        self.xcoms: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.xcoms[key] = value


@pytest.fixture
def docker_client():
    from docker import APIClient

    with mock.patch("airflow.providers.docker.hooks.docker.APIClient") as patcher:
        client = mock.Mock(spec=APIClient)
        client.create_container.return_value = {"Id": CONTAINER_ID}
        client.images.return_value = [{"Id": "dermaops-data"}]  # present: no pull
        client.containers.return_value = []  # no container left by an earlier try of this task
        client.create_host_config.return_value = mock.Mock()
        client.ping.return_value = True
        patcher.return_value = client
        yield client


def operator(monkeypatch, stage: str = "ingest"):
    from dermaops_runner import docker_mode
    from dermaops_runner.stages import spec_for

    monkeypatch.setattr(docker_mode, "resolve", lambda sets, s3_role: {"AWS_SECRET_ACCESS_KEY": "not-logged"})
    argv = ["--source", f"http://reader:{SECRET}@host/x", "--datasets", "s3://b/datasets/ham10000"]
    return docker_mode.DockerStageOperator(spec=spec_for(stage), argv=argv, secrets=("s3",), task_id=stage)


def run(client, op, status: int, lines: list[bytes]):
    client.attach.return_value = iter(lines)
    client.logs.return_value = iter(lines)
    client.wait.return_value = {"StatusCode": status}
    ti = RecordingTI()
    return ti, (lambda: op.execute({"ti": ti, "outlet_events": mock.MagicMock()}))


def test_exit_0_returns_the_summary_and_removes_the_container(docker_client, monkeypatch):
    summary = {"stage": "ingest", "status": "done", "dataset_version": "v1"}
    lines = [b"2026 INFO dermaops: fetching\n", json.dumps(summary).encode() + b"\n", b"late stderr line\n"]
    ti, execute = run(docker_client, operator(monkeypatch), 0, lines)
    assert execute() == summary
    assert "error" not in ti.xcoms
    docker_client.remove_container.assert_called_once_with(CONTAINER_ID, force=True)
    # Secrets go in the container's environment, never in its command line.
    kwargs = docker_client.create_container.call_args.kwargs
    assert kwargs["environment"]["AWS_SECRET_ACCESS_KEY"] == "not-logged"
    assert kwargs["command"][:4] == ["python", "-m", "dermaops", "ingest"]


def test_exit_2_fails_without_retry_and_pushes_the_redacted_reason(docker_client, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    reason = f"dermaops ingest: error: not found (HTTP 404): http://reader:{SECRET}@host/x/part_2.zip"
    ti, execute = run(docker_client, operator(monkeypatch), 2, [b"INFO starting\n", reason.encode() + b"\n"])
    with pytest.raises(AirflowFailException) as failed:
        execute()
    assert "stage ingest failed (exit 2)" in str(failed.value)
    assert ti.xcoms["error"] == "dermaops ingest: error: not found (HTTP 404): http://***@host/x/part_2.zip"
    assert SECRET not in str(failed.value)
    docker_client.remove_container.assert_called_once_with(CONTAINER_ID, force=True)


@pytest.mark.parametrize("status", [3, 137])
def test_transient_exit_and_oom_kill_are_retried(docker_client, monkeypatch, status):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    lines = [b"dermaops ingest: error: cannot reach S3 (EndpointConnectionError)\n"] if status == 3 else []
    ti, execute = run(docker_client, operator(monkeypatch), status, lines)
    with pytest.raises(AirflowException) as failed:
        execute()
    assert not isinstance(failed.value, AirflowFailException)  # Airflow applies the task's retries
    assert f"(exit {status})" in str(failed.value)
    expected = lines[0].decode().strip() if lines else "(the stage printed nothing on stderr)"
    assert ti.xcoms["error"] == expected
    docker_client.remove_container.assert_called_once_with(CONTAINER_ID, force=True)


def test_on_kill_removes_the_container_at_once(docker_client, monkeypatch):
    op = operator(monkeypatch)
    ti, execute = run(docker_client, op, 0, [b'{"stage": "ingest", "status": "done"}\n'])
    execute()
    docker_client.reset_mock()
    # A task killed from the UI or by a timeout: its container must not keep running. One forced remove,
    # not the provider's 10 s stop first, which the task supervisor's SIGKILL cuts short (the real engine:
    # tests/test_images.py).
    op.on_kill()
    docker_client.stop.assert_not_called()
    docker_client.remove_container.assert_called_once_with(CONTAINER_ID, force=True)
