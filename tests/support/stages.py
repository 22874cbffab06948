"""Running stages the way every execution mode does: `python -m dermaops <stage> ...` as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest


@dataclass
class StageRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict:
        """The stage's XCom: the last stdout line, which must be one JSON object."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"stage printed nothing on stdout; stderr:\n{self.stderr}"
        return json.loads(lines[-1])

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


@pytest.fixture
def run_stage(stage_env, tmp_path):
    """run_stage("ingest", "--source", ..., check=True) -> StageRun."""

    def run(*argv: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> StageRun:
        proc = subprocess.run(
            [sys.executable, "-m", "dermaops", *argv],
            capture_output=True,
            text=True,
            env={**stage_env, "DERMAOPS_SCRATCH_DIR": str(tmp_path / "scratch"), **(env or {})},
            timeout=timeout,
        )
        result = StageRun(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"stage {argv[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return result

    return run
