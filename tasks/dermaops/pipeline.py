"""The stage registry: every stage of the pipeline once, in run order (docs/architecture.md, "The DAG").

The CLI (which module runs a stage), the Airflow runner plugin (which image, GPU or not, which
secrets), the DAG, notify (the order of its task table) and the tests all read it from here. Like
dermaops.config it imports nothing heavy: the DAG file and the plugin import it at parse time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the module holding HELP, add_arguments and run (CONFIG when it has settings)
    image: str  # "data" (light image) or "torch" (PyTorch image)
    gpu: bool  # can use a GPU (DERMAOPS_GPU=1 in docker mode; the gpu queue on Celery)
    secrets: tuple[str, ...] = ("s3",)  # credential sets the runner hands it: "s3", "slack", "source"
    # Whose S3 key "s3" is (dermaops.access): which prefixes of the bucket the stage may write.
    s3_role: str = "data"
    dag: str = "retrain"  # the DAG that runs it: "retrain" (dags/ham10000_retrain.py) or "predict"


STAGES: tuple[Stage, ...] = (
    # "source": the data source's token, from a connection, never from the `source` param (dermaops.config).
    Stage("ingest", "dermaops.stages.ingest", "data", gpu=False, secrets=("s3", "source")),
    Stage("validate", "dermaops.stages.validate", "data", gpu=False),
    Stage("split", "dermaops.stages.split", "data", gpu=False),
    # Nothing new (same dataset version and recipe as the champion): the DAG skips training (force_retrain).
    Stage("changes", "dermaops.stages.changes", "data", gpu=False),
    Stage("train_baseline", "dermaops.stages.train_baseline", "data", gpu=False, s3_role="train"),
    Stage("train", "dermaops.stages.train", "torch", gpu=True, s3_role="train"),
    # Only evaluate and promote may write registry/ (champion.json, the history, the model card).
    Stage("evaluate", "dermaops.stages.evaluate", "torch", gpu=True, s3_role="registry"),
    # require_approval: applies the reviewer's answer to a challenger that awaits approval (the DAG's approve task).
    Stage("promote", "dermaops.stages.promote", "data", gpu=False, s3_role="registry"),
    Stage("notify", "dermaops.stages.notify", "data", gpu=False, secrets=("s3", "slack")),
    # "slack": prediction monitoring's alert when a batch is past a bound (dermaops.monitoring).
    Stage(
        "predict",
        "dermaops.stages.predict",
        "torch",
        gpu=True,
        secrets=("s3", "slack"),
        s3_role="predict",
        dag="predict",
    ),
)
BY_NAME = {s.name: s for s in STAGES}
# The retraining DAG's tasks, in run order.
RETRAIN = tuple(s.name for s in STAGES if s.dag == "retrain")
# The stages whose outcome a run report describes (notify reports on them, it is not one of them).
PIPELINE = tuple(name for name in RETRAIN if name != "notify")
IMAGES = ("data", "torch")


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(BY_NAME)})") from None


def run_key(run_id: str) -> str:
    """A run id safe as one S3 key segment: `manual__2026-01-05T10:00:00+00:00` ->
    `manual__2026-01-05T10-00-00-00-00` (the run's prefix is s3://<bucket>/runs/<run_key>/)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")
