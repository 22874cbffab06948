"""The run report: what one pipeline run did, built from its task states and stage summaries, rendered
as markdown (report.md in S3) and as a Slack Block Kit message. Pure: no I/O, no Slack client; the
notify stage writes and posts what this builds.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from dermaops.metrics import format_number, operating_point_line
from dermaops.pipeline import PIPELINE
from dermaops.promotion import AWAITING
from dermaops.redaction import redact

FAILED_STATES = ("failed", "upstream_failed")
MARK_KEYS = ("by", "at", "event")  # notify's --marked-failed (dermaops_runner.marks)
# The headline figures of the evaluate summary the report shows (dermaops.metrics.HEADLINE), labelled.
METRIC_LABELS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_f1", "Macro F1"),
    ("weighted_f1", "Weighted F1"),
    ("mel_recall", "Melanoma recall"),
    ("macro_auc", "Macro AUC"),
)
STATE_ICONS = {
    "success": ":white_check_mark:",
    "failed": ":x:",
    "upstream_failed": ":no_entry_sign:",
    "skipped": ":fast_forward:",
    "removed": ":heavy_minus_sign:",
}


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
    intervals: dict[str, list] = field(default_factory=dict)  # metric -> [low, high], lesion bootstrap 95 %
    operating_point: dict | None = None  # evaluate's mel_operating_point
    promoted: bool | None = None
    promotion_reason: str | None = None
    champion_uri: str | None = None
    unchanged: str | None = None  # why training was skipped (dermaops.freshness): nothing new to train on
    drift: str | None = None  # validate's drift headline when its policy asks for a warning (warn, fail)
    marked_failed: dict | None = None  # {"by", "at", "event"}: an operator marked the run failed
    slack: str | None = None  # where the message goes ("to #channel"), or why it does not
    artifacts: dict[str, str] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)


def _ordered(states: dict[str, str]) -> list[tuple[str, str]]:
    known = [t for t in PIPELINE if t in states]
    return [(t, states[t]) for t in known + sorted(set(states) - set(known))]


def build_report(
    dag_id: str,
    run_id: str,
    states: dict[str, str],
    results: dict[str, dict | None],
    report_uri: str,
    started_at: dt.datetime | None = None,
    marked_failed: dict | None = None,
    slack: str | None = None,
) -> RunReport:
    """The report of a run from {task: state} and {task: {"summary": ..., "error": ...}}; `marked_failed` says
    who marked the run failed and when (dermaops_runner.marks), `slack` where the message goes."""
    states = {str(task): str(state) for task, state in states.items()}
    # Whatever the XComs carry (an error line quoting a URL, a summary's source), report.md,
    # report.json and the Slack message are all built from this one redacted copy.
    results = json.loads(redact(json.dumps(results, default=str)))
    summaries = {t: (r or {}).get("summary") or {} for t, r in results.items()}
    errors = {t: r["error"] for t, r in results.items() if isinstance(r, dict) and r.get("error")}
    marked = {k: str(marked_failed.get(k) or "unknown") for k in MARK_KEYS} if marked_failed else None
    outcome = "failed" if marked or any(s in FAILED_STATES for s in states.values()) else "success"
    if marked:
        # A task the mark stopped (running then, failed now) has no error of its own: the mark is its reason.
        stopped = f"stopped: the run was {mark_text(marked)}"
        errors |= {t: stopped for t, s in states.items() if s in FAILED_STATES and t not in errors}
    ingest, evaluation = summaries.get("ingest", {}), summaries.get("evaluate", {})
    changes = summaries.get("changes", {})
    duration = None
    if started_at is not None:
        duration = (dt.datetime.now(dt.UTC) - started_at).total_seconds()
    artifacts: dict[str, str] = {}  # name -> URI, each URI once (later stages repeat the dataset's)
    for task in [t for t, _ in _ordered({t: "" for t in summaries})]:
        for key, value in sorted(summaries[task].items()):
            if key.endswith("_uri") and isinstance(value, str) and value not in artifacts.values():
                artifacts[f"{task}.{key}"] = value
    return RunReport(
        dag_id=dag_id,
        run_id=run_id,
        outcome=outcome,
        states=_ordered(states),
        errors=errors,
        report_uri=report_uri,
        duration_s=duration,
        dataset_uri=ingest.get("dataset_uri"),
        dataset_version=ingest.get("dataset_version"),
        n_images=ingest.get("n_images"),
        metrics={k: evaluation[k] for k, _ in METRIC_LABELS if isinstance(evaluation.get(k), int | float)},
        intervals={
            k: v
            for k, v in (evaluation.get("intervals") or {}).items()
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) for x in v)
        },
        operating_point=evaluation.get("mel_operating_point")
        if isinstance(evaluation.get("mel_operating_point"), dict)
        else None,
        **_promotion(evaluation, summaries.get("promote") or {}, states, errors),
        unchanged=changes.get("reason") if changes.get("retrain") is False else None,
        drift=_drift_warning(summaries.get("validate", {}), errors.get("validate")),
        marked_failed=marked,
        slack=slack,
        artifacts=artifacts,
        summaries=summaries,
    )


def _promotion(evaluation: dict, promotion: dict, states: dict[str, str], errors: dict[str, str]) -> dict:
    """promoted / promotion_reason / champion_uri: evaluate's decision, or, when the challenger awaited a
    reviewer (require_approval), the answer the promote stage applied ("approved by ...", "rejected by ...")."""
    if evaluation.get("decision") != AWAITING:
        keys = ("promoted", "promotion_reason", "champion_uri")
        return dict(zip(keys, (evaluation.get(k) for k in keys), strict=True))
    if promotion.get("decision"):
        return {
            "promoted": bool(promotion.get("promoted")),
            "promotion_reason": promotion.get("reason"),
            "champion_uri": promotion.get("champion_uri"),
        }
    why = (
        errors.get("promote")
        or f"approve {states.get('approve', 'did not run')}, promote {states.get('promote', 'did not run')}"
    )
    return {
        "promoted": False,
        "promotion_reason": f"{evaluation.get('promotion_reason')}; no answer was applied ({why})",
        "champion_uri": evaluation.get("champion_uri"),
    }


def _drift_warning(validation: dict, error: str | None) -> str | None:
    """The drift headline to warn about: validate's summary under policy warn, or its failure under fail."""
    drift = validation.get("drift") or {}
    if drift.get("detected") and drift.get("policy") in ("warn", "fail"):
        return f"{drift['headline']} (drift policy {drift['policy']})"
    if error and "data drift with --drift-policy fail" in error:
        return error
    return None


def render_markdown(report: RunReport) -> str:
    lines = [
        f"# DermaOps run report: {report.run_id}",
        "",
        f"- DAG: `{report.dag_id}`",
        f"- Outcome: **{report.outcome}**" + (f": {mark_text(report.marked_failed)}" if report.marked_failed else ""),
        f"- Duration: {format_duration(report.duration_s)}",
        f"- Dataset: {report.dataset_version or 'n/a'} ({report.dataset_uri or 'not ingested'})",
        *([f"- Slack: {report.slack}"] if report.slack else []),
        "",
        *([f"- :warning: **Data drift**: {report.drift}"] if report.drift else []),
        "",
        "## Tasks",
        "",
        "| task | state | error |",
        "|---|---|---|",
    ]
    lines += [f"| {task} | {state} | {report.errors.get(task, '')} |" for task, state in report.states]
    lines += ["", "## Test metrics", ""]
    if report.metrics:
        lines += ["| metric | value | 95 % interval (lesion bootstrap) |", "|---|---|---|"]
        lines += [
            f"| {label} | {format_number(report.metrics[key])} | {_interval(report.intervals.get(key))} |"
            for key, label in METRIC_LABELS
            if key in report.metrics
        ]
        if report.operating_point:
            lines += ["", operating_point_line(report.operating_point)]
    else:
        lines.append("No evaluation in this run.")
    lines += ["", "## Promotion", ""]
    if report.unchanged:
        lines.append(f"Training skipped, {report.unchanged}.")
    elif report.promoted is None:
        lines.append("No decision: evaluation did not run.")
    else:
        verdict = "promoted to champion" if report.promoted else "not promoted"
        lines.append(f"The challenger was **{verdict}**: {report.promotion_reason or 'no reason recorded'}.")
        if report.champion_uri:
            lines.append(f"Champion record: {report.champion_uri}")
    lines += ["", "## Artifacts", ""]
    lines += [f"- {name}: {uri}" for name, uri in sorted(report.artifacts.items())] or ["None."]
    return "\n".join(lines) + "\n"


def mark_text(mark: dict) -> str:
    """An operator's mark in words (the same words as the outcome task's failure, dermaops_runner.marks)."""
    return f"marked failed by {mark['by']} at {mark['at']} (Airflow audit log: {mark['event']})"


def _interval(pair) -> str:
    return f"[{pair[0]:.4f}, {pair[1]:.4f}]" if pair else "n/a"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def slack_message(report: RunReport) -> tuple[str, list[dict[str, Any]]]:
    """The notify stage's message: (fallback text, Block Kit blocks)."""
    succeeded = report.outcome == "success"
    title = f"{'✅' if succeeded else '❌'} DermaOps run {'succeeded' if succeeded else 'failed'}"
    text = f"{title}: {report.dag_id} {report.run_id}"

    if report.unchanged:
        promotion = f"*training skipped*: {report.unchanged}"
    elif report.promoted is None:
        promotion = "no decision (evaluation did not run)"
    else:
        promotion = f"{'*promoted*' if report.promoted else '*not promoted*'}: {report.promotion_reason or ''}".strip()
    facts = [
        f"*Run*\n`{report.run_id}`",
        f"*Dataset*\n{report.dataset_version or 'n/a'}" + (f" ({report.n_images:,} images)" if report.n_images else ""),
        f"*Duration*\n{format_duration(report.duration_s)}",
        f"*Model*\n{promotion}",
    ]
    task_lines = []
    for task, state in report.states:
        line = f"{STATE_ICONS.get(state, ':grey_question:')} `{task}` {state}"
        if task in report.errors:
            line += f": {report.errors[task]}"
        task_lines.append(line)

    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in facts]},
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Tasks*\n" + "\n".join(task_lines)}},
    ]
    if report.drift:
        blocks.insert(
            1, {"type": "section", "text": {"type": "mrkdwn", "text": f":warning: *Data drift*: {report.drift}"}}
        )
        text += f" (:warning: data drift: {report.drift})"
    if report.marked_failed:
        said = mark_text(report.marked_failed)
        blocks.insert(1, {"type": "section", "text": {"type": "mrkdwn", "text": f":raised_hand: The run was {said}"}})
        text += f" ({said})"
    if report.metrics:
        metric_fields = [
            {
                "type": "mrkdwn",
                "text": f"*{label}*\n{format_number(report.metrics[key])}"
                + (f" {_interval(report.intervals[key])}" if key in report.intervals else ""),
            }
            for key, label in METRIC_LABELS
            if key in report.metrics
        ]
        heading = "*Test metrics*" + (" (95 % lesion-bootstrap intervals)" if report.intervals else "")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": heading}})
        blocks.append({"type": "section", "fields": metric_fields[:10]})  # Slack allows 10 fields
        if report.operating_point:
            blocks.append(
                {"type": "section", "text": {"type": "mrkdwn", "text": operating_point_line(report.operating_point)}}
            )
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"Report: {report.report_uri}"}]})
    return text, blocks
