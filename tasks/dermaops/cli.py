"""`python -m dermaops <stage> [flags]`: the one command line every execution mode runs.

Contract (DESIGN.md): logs go to stderr; the LAST stdout line is one JSON object summarising what
the stage wrote (that line becomes the Airflow XCom); exit 0 on success, non-zero with ONE line on
stderr naming the bad thing on a user error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time

from dermaops import __version__
from dermaops.errors import StageError
from dermaops.stage import Context, scratch_dir
from dermaops.store import ArtifactStore

# Stage name -> module. Modules keep heavy imports (torch, great_expectations) inside run(), so
# building this parser (and `--help`) stays fast and works in the light image.
STAGES = {
    "ingest": "dermaops.stages.ingest",
    "validate": "dermaops.stages.validate",
    "split": "dermaops.stages.split",
    "train_baseline": "dermaops.stages.train_baseline",
    "train": "dermaops.stages.train",
    "evaluate": "dermaops.stages.evaluate",
    "notify": "dermaops.stages.notify",
    "predict": "dermaops.stages.predict",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on a bad flag; the contract wants one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


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
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        mod.add_arguments(p)
        p.add_argument("--force", action="store_true", help="redo the work even if finished outputs exist")
        p.add_argument(
            "--scratch-dir",
            default=None,
            help="local working directory (default: $DERMAOPS_SCRATCH_DIR or a temporary directory)",
        )
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser, mods


def emit(summary: dict) -> None:
    """Print the stage summary as the last stdout line (after flushing logs)."""
    sys.stderr.flush()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser, mods = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stage = mods[args.stage]
    started = time.monotonic()
    try:
        with scratch_dir(args.scratch_dir) as scratch:
            summary = stage.run(args, Context(store=ArtifactStore(), scratch=scratch))
    except StageError as exc:
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"dermaops {args.stage}: error: {reason}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dermaops {args.stage}: interrupted", file=sys.stderr, flush=True)
        return 130
    summary = {"stage": args.stage, "status": "done", **summary}
    summary.setdefault("seconds", round(time.monotonic() - started, 2))
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
