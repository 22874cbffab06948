"""Docker mode: DockerOperator running the stage's image with the stage's argv.

Secrets go through `private_environment` (resolved at execute time, hidden from the UI); the GPU
through `device_requests` for train/evaluate when DERMAOPS_GPU=1; the network is DERMAOPS_DOCKER_NETWORK
("host" by default, so a single-machine setup reaches an S3 endpoint on loopback; a compose
deployment names its network instead).
"""

from __future__ import annotations

import os
import re

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import DeviceRequest

from dermaops_runner.credentials import resolve
from dermaops_runner.results import StageResultMixin, drop_empty, error_line, summary_from_lines
from dermaops_runner.stages import StageSpec


def gpu_enabled() -> bool:
    return os.environ.get("DERMAOPS_GPU", "0").strip().lower() in ("1", "true", "yes")


class DockerStageOperator(StageResultMixin, DockerOperator):
    ui_color = "#e7eefa"

    def __init__(self, *, spec: StageSpec, argv: list[str], secrets: tuple[str, ...], **kwargs):
        super().__init__(
            image=spec.image,
            command=["python", "-m", "dermaops", spec.stage, *argv],
            environment={"PYTHONUNBUFFERED": "1"},
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

    def execute(self, context):
        self._private_environment = resolve(self.secrets)
        self.command = drop_empty(self.command)
        try:
            lines = super().execute(context) or []
        except DockerContainerFailedException as exc:
            # The provider reports the exit status only inside its message: "{'StatusCode': N}".
            match = re.search(r"'StatusCode':\s*(-?\d+)", str(exc))
            returncode = int(match.group(1)) if match else None
            logs = [line.decode() if isinstance(line, bytes) else line for line in exc.logs or []]
            self.stage_failed(context, self.spec.stage, returncode, error_line(logs))
        return self.stage_succeeded(context, summary_from_lines(self.spec.stage, lines))
