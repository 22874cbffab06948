"""Airflow plugin registering dermaops_runner.marks.RunMarkListener: the API server calls it when a user
marks a run failed, and it notes on the run who did it and when (from Airflow's audit log)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from dermaops_runner.marks import RunMarkListener


class DermaOpsRunMarksPlugin(AirflowPlugin):
    name = "dermaops_run_marks"
    listeners = [RunMarkListener()]
