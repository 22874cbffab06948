"""What both execution modes do with a finished stage process: read its summary, or fail the task
with the stage's own one-line reason.

- Exit 0: the summary is the last stdout line that parses as a JSON object naming this stage; it
  becomes the task's XCom, and its URIs and versions become the extra of the task's outlet Assets.
- Exit 2 (StageError: bad input, failed check): the task fails at once, without retries, since
  the same input fails the same way. Any other exit (3 = transient, a crash, an OOM kill) is retried.
- The one-line reason is also pushed as XCom `error`, so `notify` can say why the run failed.
- Secrets: the reason goes through dermaops.redaction.redact before it reaches the XCom or the task's
  exception; a password in a URL flag is registered with Airflow's secrets masker as soon as the argv
  is rendered, so the task log and the rendered-fields view show `***` instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from dermaops.redaction import redact, url_secrets

# Tells the stage it runs under a runner, whose task log adds the timestamp: the stage's log lines
# are then "LEVEL logger: message" (dermaops.cli), and relog() gives each its level back.
RUNNER_LOG_ENV = {"DERMAOPS_LOG_FORMAT": "runner"}
STAGE_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+: .*)$")
STAGE_ERROR_LINE = re.compile(r"^dermaops \S+: error: ")
USER_ERROR_EXIT = 2
ERROR_XCOM_KEY = "error"
# Summary values copied into the outlet Assets' event extra: what the run produced, not its metrics.
ASSET_EXTRA_KEYS = ("dataset_uri", "dataset_version", "n_images", "champion_uri", "model_uri", "promoted")


def summary_from_lines(stage: str, lines: Iterable[str]) -> dict[str, Any]:
    """The stage's JSON summary: the last line that is a JSON object for this stage.

    Searching backwards (instead of taking the very last line) keeps the summary even when the
    Docker log stream, which interleaves stdout and stderr, delivers a late stderr line after it.
    """
    for line in reversed(list(lines)):
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("stage") == stage:
            return obj
    raise ValueError(f"stage {stage} exited 0 but printed no JSON summary line on stdout")


def error_line(lines: Iterable[str]) -> str:
    """The stage's one-line reason: its last non-empty stderr line."""
    for line in reversed(list(lines)):
        if line.strip():
            return line.strip()
    return "(the stage printed nothing on stderr)"


def mask_url_secrets(argv: Iterable[str]) -> None:
    """Register every URL password of the rendered argv with Airflow's secrets masker (task logs,
    rendered fields), the way Airflow masks a connection's password when a task reads it."""
    from airflow.sdk.log import mask_secret

    for arg in argv:
        for secret in url_secrets(str(arg)):
            mask_secret(secret)


class StageResultMixin:
    """Shared by the local and Docker operators (which differ only in how the process runs)."""

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        mask_url_secrets([*(getattr(self, "argv", None) or []), *(getattr(self, "command", None) or [])])

    def stage_failed(self, context, stage: str, returncode: int | None, reason: str):
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        reason = redact(reason)
        context["ti"].xcom_push(key=ERROR_XCOM_KEY, value=reason)
        message = f"stage {stage} failed (exit {returncode}): {reason}"
        if returncode == USER_ERROR_EXIT:
            raise AirflowFailException(message)
        raise AirflowException(message)

    def stage_succeeded(self, context, summary: dict[str, Any]) -> dict[str, Any]:
        extra = {k: summary[k] for k in ASSET_EXTRA_KEYS if k in summary}
        if extra:
            for asset in getattr(self, "outlets", None) or []:
                context["outlet_events"][asset].extra.update(extra)
        return summary


def relog(log, line: str) -> None:
    """Forward one line of the stage's output to the task log at the level the stage logged it at.

    Lines of the stage's logging carry their level; the one-line error of a failed stage is an
    error; anything else (the JSON summary, a traceback, a library's print) is info."""
    match = STAGE_LOG_LINE.match(line)
    if match:
        getattr(log, match.group(1).lower())("%s", match.group(2))
    elif STAGE_ERROR_LINE.match(line):
        log.error("%s", line)
    else:
        log.info("%s", line)


def drop_empty(argv: Iterable[str]) -> list[str]:
    """Rendered argv without the items a conditional template turned into empty strings."""
    return [str(a) for a in argv if str(a) != ""]
