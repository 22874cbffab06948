"""Jinja macros the DAG's argv templates use (registered as the DAG's `user_defined_macros`).

They run at execute time on the worker, where `ti` can ask the execution API about the run; the
notify stage then receives plain JSON flags and needs no Airflow.
"""

from __future__ import annotations

import json

from dermaops.config import SOURCE_VARIABLE, argv_item, recipe_values, resolve, run_source
from dermaops.pipeline import run_key

from dermaops_runner import marks
from dermaops_runner.approval import approval_answer, request_body
from dermaops_runner.results import ERROR_XCOM_KEY


def stage_arg(params, name: str, flag: str) -> str:
    """One argv item from a trigger-form param: `--flag=value`, the recipe's value when the param is
    blank, or "" (dropped) when there is none, so the stage keeps its own default."""
    return argv_item(flag, resolve(params, name))


def setting_arg(params, name: str, flag: str) -> str:
    """One argv item from a param of a DAG without recipes (the prediction DAG): `--flag=value`, or "" when
    the param is blank, so the stage keeps its own default."""
    return argv_item(flag, params.get(name))


def source(params) -> str:
    """The source this run ingests (dermaops.config.run_source): the `source` param when one was typed, else
    the deployment's Airflow Variable, read here at execute time (never when the DAG is parsed)."""
    from airflow.sdk import Variable

    return run_source(params.get("source"), Variable.get(SOURCE_VARIABLE, default=None))


def recipe_json(params) -> str:
    """This run's recipe (dermaops.config.recipe_values) as one JSON argv item: what `changes` compares with
    the champion's and what evaluate records with a promotion."""
    return json.dumps(recipe_values(params), sort_keys=True)


def retrain_needed(ti) -> bool:
    """The short-circuit condition: what the `changes` stage decided (its summary's `retrain`)."""
    decision = ti.xcom_pull(task_ids="changes") or {}
    return bool(decision.get("retrain", True))


def task_states(ti, dag_run) -> str:
    """JSON {task_id: state} of the run's tasks before this one (not itself, nor the outcome task after it), as
    the metadata database has them now."""
    states = ti.get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id]).get(dag_run.run_id, {})
    later = {ti.task_id, *ti.task.get_flat_relative_ids(upstream=False)}
    return json.dumps({task: str(state) for task, state in states.items() if task not in later}, sort_keys=True)


def run_mark(ti, dag_run) -> str:
    """JSON {"by", "at", "event"} when an operator marked this run failed (dermaops_runner.marks), else ""."""
    mark = marks.run_mark(ti, dag_run)
    return json.dumps(mark) if mark else ""


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
    "dermaops_arg": stage_arg,
    "dermaops_setting": setting_arg,
    "dermaops_source": source,
    "dermaops_recipe": recipe_json,
    "dermaops_task_states": task_states,
    "dermaops_stage_results": stage_results,
    "dermaops_run_mark": run_mark,
    "dermaops_approval": approval_answer,
    "dermaops_approval_body": request_body,
}
