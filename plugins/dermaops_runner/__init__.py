"""The DermaOps task-runner seam (docs/architecture.md): one factory turns a stage spec into an Airflow operator.

Every stage is the same command line in every mode, `python -m dermaops <stage> [flags]`:

- `docker` (default): a container from the stage's image (DockerOperator);
- `local`: a subprocess on the worker, for machines without Docker and for fast tests.

The mode comes from the environment variable DERMAOPS_RUNNER, read when the DAG file is parsed (an
environment variable, not an Airflow Variable: parsing must not touch the metadata database). Stage
code never learns which mode runs it. A Kubernetes pod operator would plug in here as a third mode.
"""

from __future__ import annotations

import os

from dermaops_runner.stages import StageSpec, spec_for

RUNNER_MODES = ("docker", "local")


def runner_mode() -> str:
    mode = os.environ.get("DERMAOPS_RUNNER", "docker").strip().lower()
    if mode not in RUNNER_MODES:
        raise ValueError(f"DERMAOPS_RUNNER={mode!r} is not a runner mode (allowed: {', '.join(RUNNER_MODES)})")
    return mode


def stage_task(stage: str, argv: list[str], *, secrets: tuple[str, ...] | None = None, **task_kwargs):
    """An operator running `python -m dermaops <stage> <argv>`.

    argv items are Jinja templates rendered at execute time (params, XComs, run id); items that
    render to an empty string are dropped, so `"{{ '--force' if params.force_ingest else '' }}"`
    makes a flag conditional. `secrets` names the credential sets the stage receives ("s3", "slack");
    by default those of the stage registry (dermaops.pipeline).
    The operator returns the stage's JSON summary (its last stdout line) as a dict: that is the XCom.
    """
    spec = spec_for(stage)
    secrets = spec.secrets if secrets is None else tuple(secrets)
    if runner_mode() == "local":
        from dermaops_runner.local_mode import LocalStageOperator

        return LocalStageOperator(spec=spec, argv=argv, secrets=secrets, task_id=stage, **task_kwargs)
    from dermaops_runner.docker_mode import DockerStageOperator

    return DockerStageOperator(spec=spec, argv=argv, secrets=secrets, task_id=stage, **task_kwargs)


__all__ = ["RUNNER_MODES", "StageSpec", "runner_mode", "spec_for", "stage_task"]
