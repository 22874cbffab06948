"""Report a pipeline run: a markdown run report saved to S3 (always) and a Slack message (when configured).

Inputs are plain JSON flags, so the stage needs no Airflow: the DAG renders `--states` from the run's
task instances and `--results` from the stages' XComs (their JSON summaries, or the one-line error of
a failed stage). The run outcome is "failed" when any task failed or could not run because an upstream
task failed, else "success".

Slack comes from the environment (SLACK_BOT_TOKEN, DERMAOPS_SLACK_CHANNEL, DERMAOPS_SLACK_API_URL):
with no token the report is still written and the log says Slack was skipped; rate limits are retried
after the server's delay; auth and channel errors fail the stage with one line. Re-running with the
same inputs skips (no duplicate message) unless --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from dataclasses import asdict

from dermaops import slack
from dermaops.config import json_object_arg
from dermaops.run_report import build_report, render_markdown, slack_message
from dermaops.stage import Context, StageIO, fingerprint, skipped
from dermaops.store import S3Uri

HELP = "report the run: markdown report on S3 and a Slack message"
REPORT = "report.md"
log = logging.getLogger(__name__)


def _timestamp(text: str) -> dt.datetime:
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", required=True, help="the pipeline run being reported")
    parser.add_argument("--dag-id", default="dermaops_ham10000", help="the DAG the run belongs to")
    parser.add_argument(
        "--states",
        type=json_object_arg,
        required=True,
        help='JSON object {task_id: state} of the run\'s tasks, e.g. {"ingest": "success", "train": "failed"}',
    )
    parser.add_argument(
        "--results",
        type=json_object_arg,
        default={},
        help='JSON object {task_id: {"summary": <stage JSON summary or null>, "error": <one-line error or null>}}',
    )
    parser.add_argument("--started-at", type=_timestamp, default=None, help="run start (ISO 8601), for the duration")
    parser.add_argument(
        "--marked-failed",
        type=json_object_arg,
        default=None,
        help='JSON object {"by": user, "at": time, "event": audit-log event} when an operator marked the run failed',
    )
    parser.add_argument(
        "--report-out", required=True, help="output prefix of the report (s3://<b>/runs/<run_id>/notify)"
    )
    parser.add_argument(
        "--channel", default=None, help=f"Slack channel (default: ${slack.CHANNEL_ENV}); Slack needs ${slack.TOKEN_ENV}"
    )


def run(stage_io: StageIO, cfg: None, ctx: Context) -> dict:
    where = stage_io.inputs  # the run's facts, and where its report goes
    out_prefix = S3Uri.parse(where["report_out"])
    target = slack.SlackTarget.from_env(where["channel"])  # a half-configured Slack fails before anything is written
    channel = target.channel if target else None
    facts = {"run_id": where["run_id"], "states": where["states"], "results": where["results"], "channel": channel}
    if where["marked_failed"]:
        facts["marked_failed"] = where["marked_failed"]
    out = ctx.output(out_prefix, "notify", fingerprint(**facts))
    finished = out.finished()
    if finished and not stage_io.force:
        return skipped(finished)
    out.unpublish()

    report = build_report(
        where["dag_id"],
        where["run_id"],
        where["states"],
        where["results"],
        str(out.uri(REPORT)),
        started_at=where["started_at"],
        marked_failed=where["marked_failed"],
        # Said in the report itself: whoever reads it in S3 learns whether anyone was told.
        slack=f"to {channel}" if target else f"not configured (no {slack.TOKEN_ENV}): this report was not posted",
    )
    out.put_text(REPORT, render_markdown(report), "text/markdown; charset=utf-8")
    out.put_json("report.json", asdict(report))
    log.info("run report written to %s (outcome %s)", report.report_uri, report.outcome)

    if target is None:
        log.info("Slack skipped: %s is not set (the report is at %s)", slack.TOKEN_ENV, report.report_uri)
        posted = {"slack": "skipped"}
    else:
        text, blocks = slack_message(report)
        message = slack.post_message(target, text, blocks)
        posted = {"slack": "posted", "slack_channel": message["channel"], "slack_ts": message["ts"]}

    summary = {
        "outcome": report.outcome,
        "report_uri": report.report_uri,
        "run_id": report.run_id,
        # The promotion decision and its reason, on the run in the UI (this task's XCom); when evaluate
        # failed (e.g. a champion incident) its one-line error is the reason.
        "promotion": {
            "promoted": False if report.unchanged else report.promoted,
            "reason": report.unchanged
            or (report.promotion_reason if report.promoted is not None else report.errors.get("evaluate")),
        },
        **posted,
    }
    out.publish(summary)
    return summary
