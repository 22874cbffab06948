"""`python -m dermaops <stage> [flags]`: the one command line every execution mode runs.

Contract (docs/architecture.md, "The stage contract"): logs go to stderr; the LAST stdout line is one
JSON object summarising what the stage wrote (that line becomes the Airflow XCom); exit 0 on success,
non-zero with ONE line on stderr naming the bad thing on a user error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
import time

from dermaops import __version__
from dermaops.errors import StageError
from dermaops.pipeline import STAGES as REGISTRY
from dermaops.redaction import redact
from dermaops.stage import Context, StageIO, scratch_dir
from dermaops.store import ArtifactStore

# Stage name -> module, from the stage registry. Modules keep heavy imports (torch,
# great_expectations) inside run(), so building this parser (and `--help`) stays fast and works in
# the light image.
STAGES = {s.name: s.module for s in REGISTRY}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on a bad flag; the contract wants one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, redact(f"{self.prog}: error: {message}\n"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help texts are prose ("95 % intervals"), but argparse %-formats every help string to fill in
    `%(default)s`: a lone `%` made `--help` crash. Every `%` that does not start a `%(name)s` field is
    taken literally here, once for all stages, instead of asking each help text to write `%%`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        return _LONE_PERCENT.sub("%%", text) if text else text


_LONE_PERCENT = re.compile(r"%(?!\()")


def _available_stages() -> dict:
    mods = {}
    for name, module in STAGES.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # A stage that is not built yet (or whose module is missing from this image) is left out.
            if exc.name and exc.name.startswith("dermaops"):
                continue
            raise
    return mods


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = OneLineParser(prog="dermaops", description="DermaOps pipeline stages (HAM10000 retraining).")
    parser.add_argument("--version", action="version", version=f"dermaops {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", parser_class=OneLineParser)
    sub.required = True
    mods = _available_stages()
    for name, mod in mods.items():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.__doc__,
            formatter_class=HelpFormatter,
        )
        mod.add_arguments(p)
        if hasattr(mod, "CONFIG"):
            mod.CONFIG.add_arguments(p)
        p.add_argument("--force", action="store_true", help="redo the work even if finished outputs exist")
        p.add_argument(
            "--scratch-dir",
            default=None,
            help="local working directory (default: $DERMAOPS_SCRATCH_DIR or a temporary directory)",
        )
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser, mods


class RedactingFormatter(logging.Formatter):
    """Every log line (message, arguments and traceback alike) passes through `redact`: a URL with a
    password reaches log lines inside exception messages and retry warnings that no caller inspects."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str) -> None:
    # Under a runner (DERMAOPS_LOG_FORMAT=runner) the task log stamps each line itself: no second
    # timestamp here, and the level first so the runner re-logs the line at it.
    runner = os.environ.get("DERMAOPS_LOG_FORMAT") == "runner"
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s" if runner else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(RedactingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Library warnings (warnings.warn) become WARNING log lines instead of bare stderr text.
    logging.captureWarnings(True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def emit(summary: dict) -> None:
    """Print the stage summary as the last stdout line (after flushing logs)."""
    sys.stderr.flush()
    print(redact(json.dumps(summary, sort_keys=True, default=str)), flush=True)


def fail(stage: str, reason: str) -> None:
    """The stage's one-line error on stderr (what the runner pushes as XCom `error`)."""
    line = "; ".join(part.strip() for part in str(reason).splitlines() if part.strip())
    print(redact(f"dermaops {stage}: error: {line}"), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser, mods = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    stage = mods[args.stage]
    started = time.monotonic()
    try:
        # Every setting finite and in bounds before the stage reads, writes or deletes anything.
        cfg = stage.CONFIG.from_args(args) if hasattr(stage, "CONFIG") else None
        # The stage gets its locations, --force and the command line (a launcher starts its ranks with the
        # same line), never the parsed Namespace: its locations are the flags its add_arguments declares.
        line = sys.argv[1:] if argv is None else argv
        io = StageIO.from_args(args, StageIO.locations(stage.add_arguments), line)
        with scratch_dir(args.scratch_dir) as scratch:
            summary = stage.run(io, cfg, Context(store=ArtifactStore(), scratch=scratch))
    except StageError as exc:
        fail(args.stage, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dermaops {args.stage}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        # A bug, not a user error: the traceback is wanted (exit 1, retried), but through the
        # redacting log handler, since exception messages carry URLs.
        logging.getLogger("dermaops").exception("dermaops %s crashed", args.stage)
        return 1
    summary = {"stage": args.stage, "status": "done", **summary}
    summary.setdefault("seconds", round(time.monotonic() - started, 2))
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
