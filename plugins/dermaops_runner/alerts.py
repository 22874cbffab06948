"""The DAG-level failure callback: one Slack alert when a run fails, besides notify's run report.

It runs in the scheduler/dag-processor (or the `airflow dags test` process), not in a stage
container, so it uses dermaops.slack directly with the same credentials the notify stage gets. A
callback must never break the scheduler: Slack not configured is logged as skipped, errors are logged.
"""

from __future__ import annotations

import logging

from dermaops_runner.credentials import slack_env

log = logging.getLogger(__name__)


def alert_dag_failure(context) -> None:
    from dermaops import slack
    from dermaops.errors import StageError
    from dermaops.redaction import redact

    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    failed_ti = context.get("ti")
    failed_tasks = [failed_ti.task_id] if failed_ti is not None else []
    try:
        target = slack.SlackTarget.from_env(environ=slack_env())
        if target is None:
            log.info("Slack alert skipped for failed run %s: Slack is not configured", run_id)
            return
        text, blocks = slack.failure_alert(dag_id, run_id, redact(str(context.get("reason", "failed"))), failed_tasks)
        slack.post_message(target, text, blocks)
    except StageError as exc:
        log.error("Slack alert for failed run %s not sent: %s", run_id, exc)
