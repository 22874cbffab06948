"""Apply a reviewer's answer to a challenger that awaits approval (the DAG's `require_approval` param).

evaluate --require-approval records a challenger that passed the gate in the registry's
pending/<run_id>.json instead of promoting it; the DAG's `approve` task (Airflow's human-in-the-loop
operator) waits for a reviewer, and this stage gets the answer as plain flags rendered from that task's
XCom: --decision approve|reject, --reviewer, --comment, --responded-at. So the stage needs no Airflow,
and the S3 credentials stay in the stage, as for every other one.

- approve: the challenger becomes the champion through dermaops.promotion.write_promotion, the function
  the gate itself promotes with (checkpoint copy, history, model card, champion.json last), unless the
  champion changed since the gate (recorded as `superseded`);
- reject: the history records `rejected` with the reviewer and the comment; champion.json is untouched;
- --timed-out yes: nobody answered within the approval task's response timeout, and Airflow chose its
  default, Reject, with no responding user: recorded as `rejected` by nobody.

The pending record then moves to the registry's approvals/<run_id>.json with the answer (approval_uri in
the summary): pending/ lists only what still awaits a reviewer. Re-running after the answer was applied
skips (`{"status": "skipped"}`). Nothing awaiting approval, an
empty reviewer (unless timed out) or an unknown decision fail in one line (exit 2).
"""

from __future__ import annotations

import argparse
import logging

from dermaops.errors import StageError
from dermaops.promotion import Registry, resolve_approval
from dermaops.stage import Context, StageIO
from dermaops.store import S3Uri

HELP = "apply a reviewer's approval or rejection of a challenger that awaits approval"
DECISIONS = ("approve", "reject")
log = logging.getLogger(__name__)


def _decision(text: str) -> str:
    value = text.strip().lower()
    if value not in DECISIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DECISIONS)} (the reviewer's answer)")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--registry", required=True, help="model registry prefix (s3://<b>/registry/ham10000)")
    parser.add_argument("--run-id", required=True, help="the run whose challenger awaits approval")
    parser.add_argument(
        "--decision", type=_decision, required=True, help="the reviewer's answer: approve or reject (case-insensitive)"
    )
    parser.add_argument("--reviewer", required=True, help="who answered (the Airflow user name)")
    parser.add_argument("--comment", default="", help="the reviewer's comment (may be empty)")
    parser.add_argument("--responded-at", default=None, help="when the reviewer answered (ISO 8601)")
    parser.add_argument(
        "--timed-out",
        choices=("yes", "no"),
        default="no",
        help="yes: nobody answered within the response timeout, and its default (reject) applies",
    )


def run(stage_io: StageIO, cfg: None, ctx: Context) -> dict:
    answer = stage_io.inputs  # the reviewer's answer, as Airflow hands it over
    reviewer = answer["reviewer"].strip()
    timed_out = answer["timed_out"] == "yes"
    if timed_out and answer["decision"] != "reject":
        raise StageError(f"--timed-out yes with --decision {answer['decision']}: a timed-out approval is a rejection")
    if not reviewer and not timed_out:
        raise StageError("--reviewer is empty: the approval has no responding user (approve task's XCom)")
    registry = Registry(ctx.store, S3Uri.parse(answer["registry"]))
    result = resolve_approval(
        registry,
        answer["run_id"],
        approved=answer["decision"] == "approve",
        reviewer=reviewer,
        comment=answer["comment"].strip(),
        responded_at=answer["responded_at"] or None,
        scratch=ctx.scratch,
        timed_out=timed_out,
    )
    summary = {
        "run_id": answer["run_id"],
        "decision": result["decision"],
        "promoted": result["promoted"],
        "reason": result["reason"],
        "reviewer": result["approval"]["reviewer"],
        "comment": result["approval"]["comment"],
        "champion_uri": result.get("champion_uri"),
        "history_uri": result["history_uri"],
        "approval_uri": result["approval_uri"],
    }
    if result.get("status") == "skipped":
        summary["status"] = "skipped"
    return summary
