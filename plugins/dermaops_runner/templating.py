"""Jinja macros the DAG's argv templates use (registered as the DAG's `user_defined_macros`).

They run at execute time on the worker, where `ti` can ask the execution API about the run; the
notify stage then receives plain JSON flags and needs no Airflow.
"""

from __future__ import annotations

import json
import re

from dermaops_runner.results import ERROR_XCOM_KEY


def run_key(run_id: str) -> str:
    """A run id safe as one S3 key segment: `manual__2026-01-05T10:00:00+00:00` ->
    `manual__2026-01-05T10-00-00-00-00`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")


def task_states(ti, dag_run) -> str:
    """JSON {task_id: state} of every other task of this run, as the metadata database has it now."""
    states = ti.get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id]).get(dag_run.run_id, {})
    return json.dumps({task: str(state) for task, state in states.items() if task != ti.task_id}, sort_keys=True)


def stage_results(ti, task_ids: list[str]) -> str:
    """JSON {task_id: {"summary": <its XCom or null>, "error": <its one-line failure or null>}}."""
    results = {
        task: {
            "summary": ti.xcom_pull(task_ids=task),
            "error": ti.xcom_pull(task_ids=task, key=ERROR_XCOM_KEY),
        }
        for task in task_ids
    }
    return json.dumps(results, sort_keys=True, default=str)


MACROS = {
    "dermaops_run_key": run_key,
    "dermaops_task_states": task_states,
    "dermaops_stage_results": stage_results,
}
