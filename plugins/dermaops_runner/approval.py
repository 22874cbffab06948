"""Human approval before promotion (the DAG's `require_approval` param): the pieces on the Airflow side.

evaluate --require-approval records a challenger that passes the gate as awaiting approval; then

- `approval_needed` (a ShortCircuitOperator's condition) is true only for such a challenger, so the
  approval task is skipped by Airflow's own skip mechanism in every other run;
- `approve` is the standard provider's HITLOperator with the options Approve and Reject and a comment
  field: the run waits (task state awaiting_input) until a reviewer answers in the UI's Required
  Actions or through the REST API (PATCH .../taskInstances/approve/-1/hitlDetails), or until the
  response timeout (`response_timeout`, 6 days by default) passes: then Airflow answers with the
  default, Reject, and no responding user, which promote records as "nobody answered". The run holds
  the DAG's one active run while it waits, so an approval nobody answers must end before the next
  weekly run is due. Not
  ApprovalOperator: its Reject skips the tasks downstream, and the rejection must reach the `promote`
  stage to be recorded in the registry with the reviewer and the comment;
- `SlackApprovalRequest`, the approval task's notifier, posts the request to Slack with the link to the
  task's Required Actions page (built by the operator from [api] base_url);
- `approval_answer` (a macro) renders the answer from the approval task's XCom into `promote`'s flags,
  so the stage, like every other, gets plain argv and keeps its S3 credentials to itself.

Nothing secret is rendered into the approval task's fields or returned as its XCom: the subject and body
come from evaluate's summary, the XCom is the reviewer's answer. The Slack token is resolved inside the
notifier at execute time and registered with the secrets masker.
"""

from __future__ import annotations

import datetime as dt
import logging
import os

from airflow.sdk import BaseNotifier

from dermaops_runner.credentials import resolve

APPROVE, REJECT = "Approve", "Reject"
ANSWER_FIELDS = ("decision", "reviewer", "comment", "responded_at", "timed_out")
# Under the weekly schedule's 7 days: a request nobody answers is rejected before the next run is due.
TIMEOUT_ENV, DEFAULT_TIMEOUT_HOURS = "DERMAOPS_APPROVAL_TIMEOUT_HOURS", 144.0

log = logging.getLogger(__name__)


def approval_needed(ti) -> bool:
    """The short-circuit condition: evaluate left a challenger awaiting a reviewer's approval."""
    # Imported here, at run time: dermaops.promotion pulls in the S3 client, which DAG parsing never needs.
    from dermaops.promotion import AWAITING

    evaluation = ti.xcom_pull(task_ids="evaluate") or {}
    return evaluation.get("decision") == AWAITING


def response_timeout(environ=os.environ) -> dt.timedelta:
    """How long the approval task waits for a reviewer: $DERMAOPS_APPROVAL_TIMEOUT_HOURS (a deployment
    setting, read when the DAG is parsed), default 144 h. A bad value fails the DAG's import in one line."""
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return dt.timedelta(hours=DEFAULT_TIMEOUT_HOURS)
    try:
        hours = float(text)
    except ValueError:
        hours = float("nan")
    if not hours > 0 or hours == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of hours > 0")
    return dt.timedelta(hours=hours)


def approval_answer(ti, field: str, task_id: str = "approve") -> str:
    """One part of the reviewer's answer (the HITL task's XCom) as text for a `--flag=value` argv item:
    decision (the chosen option), reviewer (the responding user's name), comment, responded_at, timed_out
    ("yes" when the response timeout chose the default: an answer with no responding user). An answer
    that is not there renders decision as "", which promote refuses in one line naming the flag."""
    if field not in ANSWER_FIELDS:
        raise ValueError(f"unknown approval field {field!r} (fields: {', '.join(ANSWER_FIELDS)})")
    answer = ti.xcom_pull(task_ids=task_id) or {}
    if field == "decision":
        return ",".join(answer.get("chosen_options") or [])
    if field == "reviewer":
        user = answer.get("responded_by_user") or {}
        return str(user.get("name") or user.get("id") or "")
    if field == "comment":
        return " ".join(str((answer.get("params_input") or {}).get("comment") or "").split())
    if field == "timed_out":
        return "yes" if answer.get("chosen_options") and not answer.get("responded_by_user") else "no"
    value = answer.get("responded_at")
    return value.isoformat() if hasattr(value, "isoformat") else str(value or "")


def request_body(ti) -> str:
    """The approval request the reviewer reads (markdown): evaluate's figures and the gate's reason."""
    from dermaops.slack import approval_facts

    return "\n".join(f"- {line}" for line in approval_facts(ti.xcom_pull(task_ids="evaluate") or {}))


class SlackApprovalRequest(BaseNotifier):
    """Posts "a challenger awaits approval" with the Required Actions link, when the approval task starts
    waiting. Slack not configured is logged as skipped; a Slack error is logged and the request still
    waits in the UI (a notification must not fail the approval it announces)."""

    def notify(self, context) -> None:
        from airflow.providers.standard.operators.hitl import HITLOperator
        from dermaops import slack
        from dermaops.errors import StageError

        ti = context["ti"]
        try:
            link = HITLOperator.generate_link_to_ui_from_context(context=context)
        except ValueError as exc:  # no [api] base_url configured
            log.warning("no link to the approval page: %s", exc)
            link = None
        try:
            target = slack.SlackTarget.from_env(environ=resolve(("slack",)))
            if target is None:
                log.info("Slack skipped for the approval request of run %s: Slack is not configured", ti.run_id)
                return
            text, blocks = slack.approval_request(ti.dag_id, ti.run_id, ti.xcom_pull(task_ids="evaluate") or {}, link)
            slack.post_message(target, text, blocks)
            log.info("approval request posted to Slack (%s)", link or "no link")
        except StageError as exc:  # TransientError is one too
            log.error("Slack approval request for run %s not sent: %s", ti.run_id, exc)
