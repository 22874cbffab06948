"""Local mode: the stage's argv as a subprocess of the worker (`sys.executable -m dermaops ...`).

Both output streams are forwarded to the task log line by line while the stage runs; stdout is kept
for the summary, stderr for the one-line error.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading

from airflow.sdk import BaseOperator
from dermaops.redaction import redact

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


class LocalStageOperator(StageResultMixin, BaseOperator):
    template_fields = ("argv",)
    ui_color = "#e8f4ea"

    def __init__(self, *, spec: StageSpec, argv: list[str], secrets: tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        self.argv = argv
        self.secrets = secrets
        self._proc: subprocess.Popen | None = None

    def execute(self, context):
        secret_env = resolve(self.secrets, self.spec.s3_role)
        cmd = [sys.executable, "-m", "dermaops", self.spec.stage, *drop_empty(self.argv)]
        self.log.info("running %s", redact(shlex.join(["python", *cmd[1:]])))
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **secret_env, **RUNNER_LOG_ENV, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, so on_kill stops the stage's children too
        )
        stderr_lines: list[str] = []
        reader = threading.Thread(target=self._forward, args=(self._proc.stderr, stderr_lines), daemon=True)
        reader.start()
        stdout_lines: list[str] = []
        self._forward(self._proc.stdout, stdout_lines)
        returncode = self._proc.wait()
        reader.join()
        if returncode != 0:
            self.stage_failed(context, self.spec.stage, returncode, error_line(stderr_lines))
        return self.stage_succeeded(context, summary_from_lines(self.spec.stage, stdout_lines))

    def _forward(self, stream, sink: list[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            relog(self.log, redact(line))
            sink.append(line)

    def on_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
