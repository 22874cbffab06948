"""A run an operator marks failed stays failed, and its report says who did it and when.

"Mark Dag Run as -> Failed" (the UI, or PATCH /api/v2/dags/<dag>/dagRuns/<run> {"state": "failed"}) skips
every task that has not finished and fails the running ones, but leaves the teardowns (notify, outcome) to
run, and then does not set the run's state: Airflow leaves that to the scheduler once the teardowns are
done, and the scheduler derives it from the leaf tasks, all skipped, so the run would end green.

Airflow records who marked the run and when in its audit log (event `patch_dag_run`; the UI's Browse ->
Audit Log, REST /api/v2/eventLogs), in the API server's database, where tasks cannot read (Airflow 3
gives them no database access). So:

- `RunMarkListener` (registered by the plugin in plugins/dermaops_marks; the API server calls it in the
  request that marks the run, with the request's session) reads that audit-log entry and appends one line
  to the run's note: "Marked failed by <user> at <time> (Airflow audit log: patch_dag_run; run try <n>)".
  The note is shown on the run in the UI. The tasks do not get it (see MARK_XCOM_TASK), so the same line is
  also stored as an XCom of the run's first task;
- `run_mark(ti, dag_run)` reads that line back for the run's current try (a cleared, re-run try does not
  inherit it): notify's report says it, and the `outcome` teardown fails the run with it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re

from airflow.listeners import hookimpl

# The message the API server passes to on_dag_run_failed when a user sets the state
# (airflow.api_fastapi.core_api.services.public.dag_run.patch_dag_run_state).
MANUAL_FAILED = "manually set to `failed`"
# Audit-log events of the requests that set a run's state: one run, or several at once (the runs list).
STATE_EVENTS = ("patch_dag_run", "bulk_dag_runs")
# DAGs whose runs get the note: this project's (both DAG files carry the tag).
TAG = "dermaops"
NOTE = "Marked failed by {by} at {at} (Airflow audit log: {event}; run try {clear_number})"
NOTE_LINE = re.compile(
    r"^Marked failed by (?P<by>.+) at (?P<at>\S+) \(Airflow audit log: (?P<event>[\w.-]+); run try (?P<clear>\d+)\)$",
    re.MULTILINE,
)

# The note does not reach the tasks: the execution API builds a task's dag_run without loading its note, so
# `dag_run.note` is None in a task's context. The listener therefore also stores its line as an XCom of the
# DAG's first task, which starts no more in this try of the run (marking a run failed skips every unfinished
# task), so nothing clears it; a cleared run re-runs that task, which clears it with the new try.
MARK_XCOM_TASK = "ingest"
MARK_XCOM_KEY = "dermaops_marked_failed"

log = logging.getLogger(__name__)


def note_line(by: str, at: dt.datetime, event: str, clear_number: int) -> str:
    stamp = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return NOTE.format(by=by, at=stamp, event=event, clear_number=clear_number)


def run_mark(ti, dag_run) -> dict | None:
    """{"by", "at", "event"} when an operator marked this try of the run failed, from the listener's XCom (or
    the run's note where a context carries it), else None."""
    line = ti.xcom_pull(task_ids=MARK_XCOM_TASK, key=MARK_XCOM_KEY)
    return marked_failed("\n".join(filter(None, [dag_run.note, line])), dag_run.clear_number)


def marked_failed(note: str | None, clear_number: int | None) -> dict | None:
    """{"by", "at", "event"} of the last "Marked failed" line of this try of the run, or None."""
    marks = [m for m in NOTE_LINE.finditer(note or "") if int(m["clear"]) == (clear_number or 0)]
    if not marks:
        return None
    last = marks[-1]
    return {"by": last["by"], "at": last["at"], "event": last["event"]}


def _who_and_when(session, dag_run) -> tuple[str, dt.datetime, str]:
    """The newest audit-log entry of a state change of this run (the one being made: the request's own,
    added by Airflow's action_logging before the endpoint ran, flushed by this query)."""
    from airflow.models.log import Log
    from sqlalchemy import or_, select

    entry = session.scalars(
        select(Log)
        .where(
            Log.dag_id == dag_run.dag_id,
            Log.event.in_(STATE_EVENTS),
            or_(Log.run_id == dag_run.run_id, Log.run_id.is_(None)),
        )
        .order_by(Log.id.desc())
        .limit(1)
    ).first()
    if entry is None:
        return "an unknown user", dt.datetime.now(dt.UTC), "none"
    return entry.owner or "an unknown user", entry.dttm, entry.event


def _append(note: str | None, line: str) -> str:
    """The note with the line appended, its earlier text shortened to fit the column (else the database
    refuses the write, and with it the request that marks the run)."""
    from airflow.models.dagrun import DagRunNote

    room = DagRunNote.__table__.c.content.type.length - len(line) - 2
    note = (note or "").strip()
    if len(note) > room:
        note = note[: max(room - 1, 0)] + "…"
    return f"{note}\n\n{line}" if note else line


def outcome_task(**kwargs):
    """The `outcome` teardown that follows notify (see run_outcome): the retrain DAG's last task."""
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import TriggerRule

    task = PythonOperator(
        task_id="outcome",
        python_callable=run_outcome,
        trigger_rule=TriggerRule.ALL_DONE,
        retries=0,
        doc_md="Fails the run when an operator marked it failed, or when notify could not deliver the report.",
        **kwargs,
    )
    task.is_teardown = True
    task.on_failure_fail_dagrun = True
    return task


def run_outcome(ti, dag_run) -> None:
    """The `outcome` teardown, the DAG's last task: it fails the run when the tasks alone would leave it green
    although it must not be: an operator marked it failed (every unfinished task was skipped), or notify
    failed after its retries (the report did not reach Slack). A failed stage already fails the run through
    the leaf task it leaves upstream_failed; then this task succeeds, so the failure alert names that stage."""
    from airflow.sdk.exceptions import AirflowFailException
    from dermaops.run_report import mark_text  # the report's words (imported here: not at DAG parse time)

    mark = run_mark(ti, dag_run)
    if mark is not None:
        raise AirflowFailException(f"the run was {mark_text(mark)}")
    states = ti.get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id]).get(dag_run.run_id, {})
    failed = sorted(t for t in ti.task.upstream_task_ids if states.get(t) in ("failed", "upstream_failed"))
    if failed:
        raise AirflowFailException(f"{', '.join(failed)} failed: the run's report was not delivered")


class RunMarkListener:
    """Notes who marked a DermaOps run failed (see the module docstring). Runs in the API server."""

    @hookimpl
    def on_dag_run_failed(self, dag_run, msg: str) -> None:
        from sqlalchemy.orm import object_session

        if MANUAL_FAILED not in (msg or ""):
            return  # a run the scheduler failed: its tasks say why
        try:
            dag = getattr(dag_run, "dag", None)
            if TAG not in set(getattr(dag, "tags", None) or ()):
                return
            session = object_session(dag_run)
            if session is None:
                return
            by, at, event = _who_and_when(session, dag_run)
            line = note_line(by, at, event, dag_run.clear_number or 0)
            if dag_run.dag_run_note is None:
                dag_run.note = (line, None)  # no user: DermaOps wrote it
            else:
                dag_run.dag_run_note.content = _append(dag_run.dag_run_note.content, line)
            from airflow.models.xcom import XComModel

            XComModel.set(
                key=MARK_XCOM_KEY,
                value=line,
                dag_id=dag_run.dag_id,
                task_id=MARK_XCOM_TASK,
                run_id=dag_run.run_id,
                serialize=False,  # the column is JSON already: serializing here would store a quoted string
                session=session,
            )
            log.info("run %s of %s: %s", dag_run.run_id, dag_run.dag_id, line)
        except Exception:  # a listener must not break the request that marks the run
            log.exception("could not note who marked run %s failed", getattr(dag_run, "run_id", "?"))
