"""The stage containers a worker starts, and the ones it must not leave behind.

DockerOperator starts each stage as a sibling container on the worker host's Docker engine. A worker
that stops or dies does not stop that container by itself: it would train on as an orphan, writing
into the run's prefix while the task's retry starts a second copy. So each stage container carries
labels naming the worker and the task instance, and:

- the worker's wrapper (docker-compose.yaml) runs `containers.py stop-mine` when the worker is
  stopped (SIGTERM): the stages fail now, their tasks record the failure and are retried (training resumes
  from its last epoch checkpoint), instead of waiting on the scheduler's heartbeat timeout;
- it runs `containers.py remove-orphans` before the worker takes tasks: what a killed predecessor
  with the same hostname left behind;
- a task's next try removes any container of an earlier try of the same task instance, wherever
  that worker went (DockerStageOperator.execute).

Runs as a script in the worker container (`python /opt/airflow/plugins/dermaops_runner/containers.py
stop-mine|remove-orphans`), so it imports nothing from Airflow.
"""

from __future__ import annotations

import socket
import sys

LABEL_STAGE = "dermaops.stage"
LABEL_WORKER = "dermaops.worker"
LABEL_TASK_INSTANCE = "dermaops.task-instance"
DOCKER_URL = "unix://var/run/docker.sock"


def worker_name() -> str:
    # The Celery worker's host name (the worker container's), also what Airflow records per task try.
    return socket.gethostname()


def task_instance_key(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    return f"{dag_id}/{run_id}/{task_id}/{map_index}"


def labels(stage: str, ti_key: str) -> dict[str, str]:
    return {LABEL_STAGE: stage, LABEL_WORKER: worker_name(), LABEL_TASK_INSTANCE: ti_key}


def _ids(client, label: str, value: str, *, running_only: bool = False) -> list[str]:
    found = client.containers(all=not running_only, filters={"label": f"{label}={value}"})
    return [c["Id"] for c in found]


def remove_task_instance_containers(client, ti_key: str) -> list[str]:
    """Force-remove the containers of earlier tries of this task instance; returns their ids."""
    ids = _ids(client, LABEL_TASK_INSTANCE, ti_key)
    for cid in ids:
        client.remove_container(cid, force=True)
    return ids


def stop_mine(client) -> list[str]:
    """Kill this worker's running stage containers; their operators then fail the tasks and remove
    them. A kill, not a stop: the stage is PID 1 without a SIGTERM handler, so a stop would only
    wait out its timeout, and every stage's outputs are written atomically (an epoch checkpoint is
    either whole in S3 or absent)."""
    ids = _ids(client, LABEL_WORKER, worker_name(), running_only=True)
    for cid in ids:
        client.kill(cid)
    return ids


def remove_orphans(client) -> list[str]:
    """Force-remove every stage container labelled with this worker's name (none is ours yet)."""
    ids = _ids(client, LABEL_WORKER, worker_name())
    for cid in ids:
        client.remove_container(cid, force=True)
    return ids


def main(argv: list[str]) -> int:
    actions = {"stop-mine": stop_mine, "remove-orphans": remove_orphans}
    if len(argv) != 1 or argv[0] not in actions:
        print(f"usage: containers.py {'|'.join(actions)}", file=sys.stderr)
        return 2
    import docker

    try:
        ids = actions[argv[0]](docker.APIClient(base_url=DOCKER_URL))
    except docker.errors.DockerException as exc:
        # The worker must still start (or stop) when the engine is unreachable; say why, once.
        print(f"dermaops containers {argv[0]}: error: {exc}", file=sys.stderr)
        return 3
    print(f"dermaops containers {argv[0]}: {len(ids)} container(s) on {worker_name()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
