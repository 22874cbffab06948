"""The DermaOps task-runner seam (docs/architecture.md): one factory turns a stage spec into an Airflow operator.

Every stage is the same command line in every mode, `python -m dermaops <stage> [flags]`:

- `docker` (default): a container from the stage's image (DockerOperator);
- `local`: a subprocess on the worker, for machines without Docker and for fast tests;
- `kubernetes`: a pod per stage (KubernetesPodOperator), secrets from Kubernetes Secrets, GPUs as
  `nvidia.com/gpu` limits; configured by DERMAOPS_K8S_* variables (kubernetes_mode.py). Not yet run
  on a cluster.

The mode comes from the environment variable DERMAOPS_RUNNER, read when the DAG file is parsed (an
environment variable, not an Airflow Variable: parsing must not touch the metadata database). Stage
code never learns which mode runs it.
"""

from __future__ import annotations

import os

from dermaops_runner.stages import StageSpec, spec_for

RUNNER_MODES = ("docker", "local", "kubernetes")


def runner_mode() -> str:
    mode = os.environ.get("DERMAOPS_RUNNER", "docker").strip().lower()
    if mode not in RUNNER_MODES:
        raise ValueError(f"DERMAOPS_RUNNER={mode!r} is not a runner mode (allowed: {', '.join(RUNNER_MODES)})")
    return mode


def queue_for(spec: StageSpec) -> str:
    """The Celery queue of a stage: GPU stages (train, evaluate) on DERMAOPS_GPU_QUEUE ("gpu"), the
    rest on DERMAOPS_DEFAULT_QUEUE ("default"), so a GPU host only needs a worker serving its queue.
    Read at parse time, like DERMAOPS_RUNNER; executors without queues ignore it."""
    if spec.gpu:
        return os.environ.get("DERMAOPS_GPU_QUEUE", "").strip() or "gpu"
    return os.environ.get("DERMAOPS_DEFAULT_QUEUE", "").strip() or "default"


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
    task_kwargs.setdefault("queue", queue_for(spec))
    mode = runner_mode()
    if mode == "kubernetes":
        from dermaops_runner.kubernetes_mode import KubernetesStageOperator

        return KubernetesStageOperator(spec=spec, argv=argv, secrets=secrets, task_id=stage, **task_kwargs)
    if mode == "local":
        from dermaops_runner.local_mode import LocalStageOperator

        return LocalStageOperator(spec=spec, argv=argv, secrets=secrets, task_id=stage, **task_kwargs)
    from dermaops_runner.docker_mode import DockerStageOperator

    return DockerStageOperator(spec=spec, argv=argv, secrets=secrets, task_id=stage, **task_kwargs)


__all__ = ["RUNNER_MODES", "StageSpec", "queue_for", "runner_mode", "spec_for", "stage_task"]
