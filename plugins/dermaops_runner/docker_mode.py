"""Docker mode: DockerOperator running the stage's image with the stage's argv.

Secrets go through `private_environment` (resolved at execute time, hidden from the UI); every GPU of
the host through `device_requests` for the GPU stages when DERMAOPS_GPU=1 (train runs one process per
GPU it sees, with the larger /dev/shm of stages.STAGE_SHM_SIZE); the network is DERMAOPS_DOCKER_NETWORK
("host" by default, so a single-machine setup reaches an S3 endpoint on loopback; a compose
deployment names its network instead). Each container is labelled with its worker and task
instance, so none outlives its task (containers.py).
"""

from __future__ import annotations

import os
import re

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from docker.errors import APIError
from docker.types import DeviceRequest

from dermaops_runner.containers import labels, remove_task_instance_containers, task_instance_key
from dermaops_runner.credentials import resolve
from dermaops_runner.results import (
    RUNNER_LOG_ENV,
    StageResultMixin,
    drop_empty,
    error_line,
    relog,
    summary_from_lines,
)
from dermaops_runner.stages import StageSpec


def gpu_enabled() -> bool:
    return os.environ.get("DERMAOPS_GPU", "0").strip().lower() in ("1", "true", "yes")


class _StageLineLog:
    """The operator's logger as the provider's log pump sees it: it forwards each container line as
    `log.info("%s", line)`; those lines are re-logged at the stage's own level (results.relog)."""

    def __init__(self, log):
        self._log = log

    def info(self, msg, *args, **kwargs):
        if msg == "%s" and len(args) == 1 and isinstance(args[0], str) and not kwargs:
            return relog(self._log, args[0])
        return self._log.info(msg, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._log, name)


class DockerStageOperator(StageResultMixin, DockerOperator):
    ui_color = "#e7eefa"

    def __init__(self, *, spec: StageSpec, argv: list[str], secrets: tuple[str, ...], **kwargs):
        super().__init__(
            image=spec.image,
            command=["python", "-m", "dermaops", spec.stage, *argv],
            environment={"PYTHONUNBUFFERED": "1", **RUNNER_LOG_ENV},
            auto_remove="force",
            mount_tmp_dir=False,
            network_mode=os.environ.get("DERMAOPS_DOCKER_NETWORK", "host"),
            shm_size=spec.shm_size,
            device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])] if spec.gpu and gpu_enabled() else None,
            # All lines come back; summary_from_lines picks the summary (see results.py).
            do_xcom_push=True,
            xcom_all=True,
            **kwargs,
        )
        self.spec = spec
        self.secrets = secrets

    @property
    def log(self):
        return _StageLineLog(super().log)

    def execute(self, context):
        self._private_environment = resolve(self.secrets, self.spec.s3_role)
        self.command = drop_empty(self.command)
        ti = context["ti"]
        key = task_instance_key(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))
        self.labels = labels(self.spec.stage, key)
        stale = remove_task_instance_containers(self.cli, key)
        if stale:
            self.log.warning("removed %d container(s) left by an earlier try of this task: %s", len(stale), stale)
        try:
            lines = super().execute(context) or []
        except DockerContainerFailedException as exc:
            # The provider reports the exit status only inside its message: "{'StatusCode': N}".
            match = re.search(r"'StatusCode':\s*(-?\d+)", str(exc))
            returncode = int(match.group(1)) if match else None
            logs = [line.decode() if isinstance(line, bytes) else line for line in exc.logs or []]
            self.stage_failed(context, self.spec.stage, returncode, error_line(logs))
        return self.stage_succeeded(context, summary_from_lines(self.spec.stage, lines))

    def on_kill(self) -> None:
        # The provider's on_kill stops the container (SIGTERM, then SIGKILL after 10 s: a stage is PID 1
        # without a SIGTERM handler, so it always waits the 10 s) and only then removes it. The task
        # supervisor kills this process a few seconds after its own SIGTERM, so the removal never ran and
        # a run marked failed left its stage container behind. One forced remove kills and removes at once;
        # every stage output is written atomically, so nothing half-written is kept.
        if not self.hook.client_created or self.container is None:
            return
        self.log.info("removing stage container %s (the task was stopped)", self.container["Id"][:12])
        try:
            self.cli.remove_container(self.container["Id"], force=True)
        except APIError as exc:
            self.log.info("stage container %s already gone: %s", self.container["Id"][:12], exc)
