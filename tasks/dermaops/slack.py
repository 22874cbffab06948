"""Slack for DermaOps: Block Kit messages and posting them with slack-sdk's `chat.postMessage`.

Configuration is environment only (the task runner fills it from an Airflow connection or the
worker's environment): SLACK_BOT_TOKEN, DERMAOPS_SLACK_CHANNEL, and DERMAOPS_SLACK_API_URL (default
https://slack.com/api/; tests point it at a loopback server). No token means Slack is not configured,
and callers skip posting. The token never appears in logs, errors or reprs.

Rate limits are retried after the server's Retry-After delay (slack-sdk's RateLimitErrorRetryHandler);
any other Slack error (invalid_auth, channel_not_found, ...) is a StageError with one clear line; an
unreachable Slack API (connection refused, DNS, timeout) is a TransientError (exit 3).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dermaops.errors import StageError, TransientError

TOKEN_ENV = "SLACK_BOT_TOKEN"
CHANNEL_ENV = "DERMAOPS_SLACK_CHANNEL"
API_URL_ENV = "DERMAOPS_SLACK_API_URL"
DEFAULT_API_URL = "https://slack.com/api/"
RATE_LIMIT_RETRIES = 3

# What to do about the Slack errors a misconfigured deployment hits.
ERROR_HINTS = {
    "invalid_auth": f"the bot token is not valid; check {TOKEN_ENV} or the slack_api_default connection",
    "not_authed": f"no bot token was sent; check {TOKEN_ENV}",
    "account_inactive": "the bot token belongs to a deactivated app or user",
    "token_revoked": "the bot token was revoked; issue a new one",
    "channel_not_found": "the channel does not exist or the bot cannot see it; check " + CHANNEL_ENV,
    "not_in_channel": "the bot is not a member of the channel; invite it",
    "is_archived": "the channel is archived",
    "ratelimited": f"still rate limited after {RATE_LIMIT_RETRIES} retries",
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlackTarget:
    channel: str
    api_url: str
    token: str = field(repr=False)

    @classmethod
    def from_env(cls, channel: str | None = None, environ: Mapping[str, str] | None = None) -> SlackTarget | None:
        """The configured target (from `environ`, default os.environ), or None when no token is set."""
        environ = os.environ if environ is None else environ
        token = environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
        channel = (channel or environ.get(CHANNEL_ENV, "")).strip()
        if not channel:
            raise StageError(f"{TOKEN_ENV} is set but no Slack channel is: set {CHANNEL_ENV} or --channel")
        api_url = environ.get(API_URL_ENV, "").strip() or DEFAULT_API_URL
        return cls(channel=channel, api_url=api_url.rstrip("/") + "/", token=token)


def post_message(target: SlackTarget, text: str, blocks: list[dict[str, Any]]) -> dict[str, str]:
    """Post one message; returns {"channel", "ts"}. Raises StageError with a one-line reason."""
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError
    from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

    client = WebClient(
        token=target.token,
        base_url=target.api_url,
        timeout=30,
        retry_handlers=[
            RateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
            ConnectionErrorRetryHandler(max_retry_count=2),
        ],
    )
    try:
        response = client.chat_postMessage(channel=target.channel, text=text, blocks=blocks)
    except SlackApiError as exc:
        error = exc.response.get("error", "unknown_error") if exc.response is not None else "unknown_error"
        hint = ERROR_HINTS.get(error, f"HTTP {exc.response.status_code}" if exc.response is not None else "")
        raise StageError(f"Slack chat.postMessage to {target.channel} failed: {error} ({hint})") from None
    except OSError as exc:  # connection refused, DNS, TLS: urllib's errors are OSErrors
        # A network failure is transient (exit 3, by the stage contract), after slack-sdk's own retries.
        raise TransientError(f"cannot reach the Slack API at {target.api_url}: {exc}") from None
    log.info("posted to Slack channel %s (ts %s)", response["channel"], response["ts"])
    return {"channel": response["channel"], "ts": response["ts"]}


def failure_alert(dag_id: str, run_id: str, reason: str, failed_tasks: list[str]) -> tuple[str, list[dict]]:
    """The DAG failure callback's message: short, points at the failed tasks."""
    tasks = ", ".join(f"`{t}`" for t in failed_tasks) or "none recorded"
    text = f"🚨 DermaOps DAG {dag_id} failed: run {run_id}"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": f"🚨 DermaOps DAG {dag_id} failed"}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"*Run* `{run_id}`\n*Failed tasks* {tasks}\n*Reason* {reason}"},
        },
    ]
    return text, blocks


def approval_facts(evaluation: dict) -> list[str]:
    """What a reviewer decides on, one line each, from evaluate's summary: the headline test figures with
    their intervals, the melanoma operating point and the gate's reason (markdown, for Slack and the UI)."""
    from dermaops.redaction import redact

    intervals = evaluation.get("intervals") or {}
    lines = []
    for key, label in (("macro_f1", "Macro F1"), ("mel_recall", "Melanoma recall"), ("macro_auc", "Macro AUC"),
                       ("accuracy", "Accuracy")):  # fmt: skip
        value = evaluation.get(key)
        if isinstance(value, int | float):
            pair = intervals.get(key)
            lines.append(f"{label} {value:.4f}" + (f" [{pair[0]:.4f}, {pair[1]:.4f}]" if pair else ""))
    if evaluation.get("promotion_reason"):
        lines.append(f"Gate: {evaluation['promotion_reason']}")
    for key, label in (("report_uri", "Evaluation report"), ("pending_uri", "Pending record")):
        if evaluation.get(key):
            lines.append(f"{label}: {evaluation[key]}")
    return [redact(line) for line in lines] or ["No evaluation summary found."]


def approval_request(dag_id: str, run_id: str, evaluation: dict, link: str | None) -> tuple[str, list[dict]]:
    """The approval task's message: a challenger passed the gate and waits for a reviewer; where to answer."""
    where = f"<{link}|Approve or reject it in Required Actions>" if link else "Approve or reject it in Required Actions"
    text = f"🧑‍⚕️ DermaOps run {run_id} awaits approval: {where}"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "🧑‍⚕️ DermaOps: a challenger awaits approval"}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"*Run* `{run_id}` ({dag_id})\n" + "\n".join(f"• {f}" for f in approval_facts(evaluation)),
            },
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{where}*. champion.json changes only on Approve."}},
    ]
    return text, blocks
