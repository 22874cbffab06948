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
import json
import logging
from dataclasses import asdict, dataclass, field

from dermaops import slack
from dermaops.redaction import redact
from dermaops.stage import fingerprint, skipped
from dermaops.store import S3Uri

HELP = "report the run: markdown report on S3 and a Slack message"
PIPELINE_ORDER = ("ingest", "validate", "split", "train_baseline", "train", "evaluate")
FAILED_STATES = ("failed", "upstream_failed")
REPORT = "report.md"
log = logging.getLogger(__name__)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


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
        type=_json_object,
        required=True,
        help='JSON object {task_id: state} of the run\'s tasks, e.g. {"ingest": "success", "train": "failed"}',
    )
    parser.add_argument(
        "--results",
        type=_json_object,
        default={},
        help='JSON object {task_id: {"summary": <stage JSON summary or null>, "error": <one-line error or null>}}',
    )
    parser.add_argument("--started-at", type=_timestamp, default=None, help="run start (ISO 8601), for the duration")
    parser.add_argument(
        "--report-out", required=True, help="output prefix of the report (s3://<b>/runs/<run_id>/notify)"
    )
    parser.add_argument(
        "--channel", default=None, help=f"Slack channel (default: ${slack.CHANNEL_ENV}); Slack needs ${slack.TOKEN_ENV}"
    )


@dataclass
class RunReport:
    """Everything the report and the Slack message say about one run."""

    dag_id: str
    run_id: str
    outcome: str
    states: list[tuple[str, str]]
    errors: dict[str, str]
    report_uri: str
    duration_s: float | None = None
    dataset_uri: str | None = None
    dataset_version: str | None = None
    n_images: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    promoted: bool | None = None
    promotion_reason: str | None = None
    champion_uri: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)


def _ordered(states: dict[str, str]) -> list[tuple[str, str]]:
    known = [t for t in PIPELINE_ORDER if t in states]
    return [(t, states[t]) for t in known + sorted(set(states) - set(known))]


def build_report(args, report_uri: S3Uri) -> RunReport:
    states = {str(task): str(state) for task, state in args.states.items()}
    # Whatever the XComs carry (an error line quoting a URL, a summary's source), report.md,
    # report.json and the Slack message are all built from this one redacted copy.
    results = json.loads(redact(json.dumps(args.results, default=str)))
    summaries = {t: (r or {}).get("summary") or {} for t, r in results.items()}
    errors = {t: r["error"] for t, r in results.items() if isinstance(r, dict) and r.get("error")}
    outcome = "failed" if any(s in FAILED_STATES for s in states.values()) else "success"
    ingest, evaluation = summaries.get("ingest", {}), summaries.get("evaluate", {})
    duration = None
    if args.started_at is not None:
        duration = (dt.datetime.now(dt.UTC) - args.started_at).total_seconds()
    artifacts: dict[str, str] = {}  # name -> URI, each URI once (later stages repeat the dataset's)
    for task in [t for t, _ in _ordered({t: "" for t in summaries})]:
        for key, value in sorted(summaries[task].items()):
            if key.endswith("_uri") and isinstance(value, str) and value not in artifacts.values():
                artifacts[f"{task}.{key}"] = value
    return RunReport(
        dag_id=args.dag_id,
        run_id=args.run_id,
        outcome=outcome,
        states=_ordered(states),
        errors=errors,
        report_uri=str(report_uri),
        duration_s=duration,
        dataset_uri=ingest.get("dataset_uri"),
        dataset_version=ingest.get("dataset_version"),
        n_images=ingest.get("n_images"),
        metrics={k: evaluation[k] for k, _ in slack.METRIC_LABELS if isinstance(evaluation.get(k), int | float)},
        promoted=evaluation.get("promoted"),
        promotion_reason=evaluation.get("promotion_reason"),
        champion_uri=evaluation.get("champion_uri"),
        artifacts=artifacts,
        summaries=summaries,
    )


def render_markdown(report: RunReport) -> str:
    lines = [
        f"# DermaOps run report: {report.run_id}",
        "",
        f"- DAG: `{report.dag_id}`",
        f"- Outcome: **{report.outcome}**",
        f"- Duration: {slack.format_duration(report.duration_s)}",
        f"- Dataset: {report.dataset_version or 'n/a'} ({report.dataset_uri or 'not ingested'})",
        "",
        "## Tasks",
        "",
        "| task | state | error |",
        "|---|---|---|",
    ]
    lines += [f"| {task} | {state} | {report.errors.get(task, '')} |" for task, state in report.states]
    lines += ["", "## Test metrics", ""]
    if report.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [
            f"| {label} | {report.metrics[key]:.4f} |" for key, label in slack.METRIC_LABELS if key in report.metrics
        ]
    else:
        lines.append("No evaluation in this run.")
    lines += ["", "## Promotion", ""]
    if report.promoted is None:
        lines.append("No decision: evaluation did not run.")
    else:
        verdict = "promoted to champion" if report.promoted else "not promoted"
        lines.append(f"The challenger was **{verdict}**: {report.promotion_reason or 'no reason recorded'}.")
        if report.champion_uri:
            lines.append(f"Champion record: {report.champion_uri}")
    lines += ["", "## Artifacts", ""]
    lines += [f"- {name}: {uri}" for name, uri in sorted(report.artifacts.items())] or ["None."]
    return "\n".join(lines) + "\n"


def run(args, ctx) -> dict:
    out_prefix = S3Uri.parse(args.report_out)
    target = slack.SlackTarget.from_env(args.channel)  # a half-configured Slack fails before anything is written
    channel = target.channel if target else None
    out = ctx.output(
        out_prefix, "notify", fingerprint(run_id=args.run_id, states=args.states, results=args.results, channel=channel)
    )
    finished = out.finished()
    if finished and not args.force:
        return skipped(finished)
    out.unpublish()

    report = build_report(args, out.uri(REPORT))
    out.put_text(REPORT, render_markdown(report), "text/markdown; charset=utf-8")
    out.put_json("report.json", asdict(report))
    log.info("run report written to %s (outcome %s)", report.report_uri, report.outcome)

    if target is None:
        log.info("Slack skipped: %s is not set (the report is at %s)", slack.TOKEN_ENV, report.report_uri)
        posted = {"slack": "skipped"}
    else:
        text, blocks = slack.run_message(report)
        message = slack.post_message(target, text, blocks)
        posted = {"slack": "posted", "slack_channel": message["channel"], "slack_ts": message["ts"]}

    summary = {
        "outcome": report.outcome,
        "report_uri": report.report_uri,
        "run_id": report.run_id,
        # The promotion decision and its reason, on the run in the UI (this task's XCom); when evaluate
        # failed (e.g. a champion incident) its one-line error is the reason.
        "promotion": {
            "promoted": report.promoted,
            "reason": report.promotion_reason if report.promoted is not None else report.errors.get("evaluate"),
        },
        **posted,
    }
    out.publish(summary)
    return summary
