"""The Python side of `scripts/run` (the whole DAG on this machine): copies between a folder and the
embedded S3, the run's params from a recipe, and what happened in the run.

    python -m dermaops.devrun exports ENV_JSON                  shell `export` lines of a JSON env file
    python -m dermaops.devrun copy up|down DIR s3://bucket/prefix    prints how many files it copied
    python -m dermaops.devrun conf RECIPE [--source S] [--extra JSON]
    python -m dermaops.devrun redact TEXT                      TEXT with its secrets masked, for the console
    python -m dermaops.devrun outcome DAG_ID MIRROR_DIR [--airflow BIN]

The run's outcome is read through Airflow's own CLI (`airflow dags list-runs`, `airflow tasks
states-for-dag-run`, JSON output), never from its database tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
from pathlib import Path

from dermaops.config import RECIPES, SOURCE_CREDENTIALS_RULE
from dermaops.errors import StageError
from dermaops.pipeline import run_key
from dermaops.redaction import has_url_secret, redact
from dermaops.safepath import local_path

REPORTS = ("notify/report.md", "evaluation/report.md", "evaluation/metrics.json", "validation/dq_report.md")


def exports(env_file: Path) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in json.loads(env_file.read_text()).items())


def copy(direction: str, local: Path, prefix: str) -> int:
    """Mirror a folder to an S3 prefix (up) or a prefix to a folder (down); returns the number of files."""
    from dermaops.store import ArtifactStore, S3Uri

    uri, store = S3Uri.parse(prefix), ArtifactStore()
    if direction == "up":
        files = [p for p in sorted(local.rglob("*")) if p.is_file()]
        for path in files:
            store.put_file(uri.join(path.relative_to(local).as_posix()), path)
        return len(files)
    base = uri.key.rstrip("/") + "/" if uri.key else ""
    objects = [
        (obj, local_path(local, obj.key[len(base) :], f"copy down {prefix}: object {obj}"))
        for obj, _ in store.list(uri)
    ]
    for obj, path in objects:  # every name checked before the first file is written
        store.download(obj, path)
    return len(objects)


def conf(recipe: str, source: str | None, extra: str) -> dict:
    """The DAG run's params: the recipe (its values are the DAG's, dermaops.config.RECIPES), the source,
    then the caller's own params over them."""
    if recipe not in RECIPES:
        raise SystemExit(f"run: unknown recipe {recipe!r} (recipes: {', '.join(RECIPES)})")
    params: dict = {"recipe": recipe}
    if source:
        params["source"] = source
    try:
        more = json.loads(extra)
    except ValueError as exc:
        raise SystemExit(f"run: --conf is not valid JSON: {exc}") from None
    if not isinstance(more, dict):
        raise SystemExit("run: --conf must be a JSON object")
    params = {**params, **more}
    if has_url_secret(str(params.get("source", ""))):
        # The DAG refuses it too (its source param's schema), but only after the command line and the conf
        # were printed; and Airflow's refusal quotes the value back.
        raise SystemExit(f"run: --source: {SOURCE_CREDENTIALS_RULE}")
    return params


def _airflow_json(airflow: str, *argv: str) -> list[dict]:
    proc = subprocess.run([airflow, *argv, "--output", "json"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"run: airflow {' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
    # Airflow may print log lines before the JSON document; the document is the last line that starts it.
    start = max(i for i, line in enumerate(proc.stdout.splitlines()) if line.lstrip().startswith("["))
    return json.loads("\n".join(proc.stdout.splitlines()[start:]))


def _seconds(row: dict) -> float:
    if not row.get("start_date") or not row.get("end_date"):
        return 0.0
    return (dt.datetime.fromisoformat(row["end_date"]) - dt.datetime.fromisoformat(row["start_date"])).total_seconds()


def dag_order(dag_id: str) -> list[str]:
    """The DAG's task ids in its order: upstream before downstream, ties in the order the DAG file defines
    them (the DAG parsed from the configured dags folder, as `airflow dags test` parses it)."""
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=conf.get("core", "dags_folder")).dags[dag_id]
    defined = list(dag.task_dict)
    upstream = {t: set(dag.task_dict[t].upstream_task_ids) for t in defined}
    ordered: list[str] = []
    while len(ordered) < len(defined):
        ready = next(t for t in defined if t not in ordered and upstream[t] <= set(ordered))
        ordered.append(ready)
    return ordered


def outcome(dag_id: str, mirror: Path, airflow: str = "airflow") -> str:
    """The latest run of the DAG, its tasks and where its outputs are, as `scripts/run` prints it."""
    runs = _airflow_json(airflow, "dags", "list-runs", dag_id)
    if not runs:
        return f"\nno run of {dag_id} was recorded"
    run = runs[0]  # newest first
    lines = [f"\nrun {run['run_id']}: {run['state']}"]
    tasks = _airflow_json(airflow, "tasks", "states-for-dag-run", dag_id, run["run_id"])
    order = {task_id: i for i, task_id in enumerate(dag_order(dag_id))}
    for task in sorted(tasks, key=lambda t: order.get(t["task_id"], len(order))):
        lines.append(f"  {task['task_id']:<15} {task['state'] or 'not run':<16} {_seconds(task):8.1f} s")
    run_dir = mirror / "runs" / run_key(run["run_id"])
    lines += ["", "outputs:"]
    lines += [f"  {run_dir / name}" for name in REPORTS if (run_dir / name).exists()]
    champion = mirror / "registry" / "ham10000" / "champion.json"
    if champion.exists():
        lines.append(f"  {champion} (champion from run {json.loads(champion.read_text()).get('run_id')})")
    lines.append(f"  everything: {mirror}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermaops.devrun", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("exports")
    p.add_argument("env_file", type=Path)
    p = sub.add_parser("copy")
    p.add_argument("direction", choices=("up", "down"))
    p.add_argument("local", type=Path)
    p.add_argument("prefix")
    p = sub.add_parser("conf")
    p.add_argument("recipe")
    p.add_argument("--source", default=None)
    p.add_argument("--extra", default="{}")
    p = sub.add_parser("redact")
    p.add_argument("text")
    p = sub.add_parser("outcome")
    p.add_argument("dag_id")
    p.add_argument("mirror", type=Path)
    p.add_argument("--airflow", default="airflow")
    args = parser.parse_args(argv)
    if args.command == "exports":
        print(exports(args.env_file))
    elif args.command == "copy":
        try:
            print(copy(args.direction, args.local, args.prefix))  # the count, for the caller's own words
        except StageError as exc:
            raise SystemExit(f"run: {exc}") from None
    elif args.command == "conf":
        print(json.dumps(conf(args.recipe, args.source, args.extra)))
    elif args.command == "redact":
        print(redact(args.text))
    else:
        print(outcome(args.dag_id, args.mirror, args.airflow))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
