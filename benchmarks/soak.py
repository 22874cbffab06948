"""Soak test of the compose deployment: N scheduled-style runs back to back on one stack, a service restarted
around each, and after every run a check that nothing was lost, stuck or left behind and that the registry
agrees with itself. Prints one JSON summary (the last stdout line) and writes a report.

    .venv/bin/python benchmarks/soak.py                                        # 10 runs, the five restarts in turn
    .venv/bin/python benchmarks/soak.py --runs 2 --restarts worker scheduler   # the short version
    .venv/bin/python benchmarks/soak.py --runs 3 --keep                        # leave the stack up afterwards

The stack: `scripts/stack up` through tests/support/stack.py's Stack (its own project `dermaops-soak`, env
file, network and loopback ports, so it never meets another stack), one Celery worker serving both queues,
and the weekly schedule off (AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=false) so that the soak's runs are the only
ones. `scripts/stack down -v` at the end unless --keep; the services' logs are kept beside the report.

The runs are triggered as the weekly run is made: the DAG's defaults and the deployment's source (the
Airflow Variable that `scripts/stack seed` sets; no `source` in the conf), plus the deployment test's
small recipe (tests/support/recipes.py SMALL_FORM over quick-cpu: ResNet-18 at 40 px, 6 epochs of 500
images, a one-tree baseline, the gate's absolute floors off), the cheapest recipe that still trains a real
CNN: about a minute of training on 2 cores.

The data: runs 1, 4, 7, ... seed a new small pack (about 90 images per class, whole lesions, from the real
28 px pack; another subset each time, so another dataset version) and the other runs ingest the same source
again, so that both the training path and the skip path ("nothing new, nothing trained") run. Which one a
run must take is read from champion.json before it: a run whose dataset version and recipe are the
champion's must skip; any other must train (after a refused challenger, an unchanged-data run trains again).

Restarts, one per run, in the order --restarts gives (default: all five in turn):
  s3         `docker compose restart minio` before the run; every object (key, ETag) must be there after it
  worker     `restart airflow-worker` while train runs, after its first epoch checkpoint: the task fails, is
             retried and resumes from the checkpoint
  scheduler  `restart airflow-scheduler` while a task of the run is running
  postgres   `restart postgres` before the run
  redis      `restart redis` before the run
A worker restart needs a run that trains: when the next kind is `worker` and the run may skip training, the
kind after it goes first and the worker waits for the next run that must train.

After every run:
  lost, stuck  every run triggered so far is still listed, in its final state; this one ended within --run-timeout
  outcome      it succeeded, and trained (evaluate promoted or refused its model) or skipped, as it had to
  orphans      no stage container (label dermaops.stage) is left on the stack's network
  manifests    every manifest.json in the bucket (dataset versions, image caches, stage outputs): each file it lists
               is there with its size and sha256 (an object is hashed again when its ETag changed, and all of them
               after an S3 restart)
  registry     champion.json is readable; its model's bytes have its sha256; the history entry it names records
               its promotion; the last promotion in the history is its run; one decision per trained run and
               none per skipped one; nothing awaits approval
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECT = "dermaops-soak"
KINDS = ("s3", "worker", "scheduler", "postgres", "redis")
SERVICE = {
    "s3": "minio",
    "worker": "airflow-worker",
    "scheduler": "airflow-scheduler",
    "postgres": "postgres",
    "redis": "redis",
}
BEFORE_RUN = {"s3", "postgres", "redis"}
RECIPE_NAME = "quick-cpu + SMALL_FORM (tests/support/recipes.py)"
REGISTRY_PREFIX = "registry/ham10000"
CHANGED_EVERY = 3
SKIPPED_BY_SHORT_CIRCUIT = ("train_baseline", "train", "evaluate")


def log(message: str) -> None:
    print(f"[soak {dt.datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="runs back to back (default 10)")
    p.add_argument(
        "--restarts",
        nargs="*",
        choices=KINDS,
        default=list(KINDS),
        metavar="KIND",
        help=f"restart kinds, one per run, in turn ({', '.join(KINDS)}; default all; none: no restarts)",
    )
    p.add_argument("--report", type=Path, help="the report (markdown; a .json beside it); default out/soak/<time>.md")
    p.add_argument("--keep", action="store_true", help="leave the stack up (and its env file) afterwards")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds a run may take before it counts as stuck")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1 (got {args.runs})")
    if len(set(args.restarts)) != len(args.restarts):
        p.error(f"--restarts names a kind twice: {' '.join(args.restarts)}")
    if args.run_timeout <= 0:
        p.error(f"--run-timeout must be positive (got {args.run_timeout})")
    return args


# -- the data -------------------------------------------------------------------------------------------


def changed_data(n: int) -> bool:
    """Run n (1-based) brings new data: runs 1, 4, 7, ..."""
    return (n - 1) % CHANGED_EVERY == 0


def make_pack(work: Path, k: int) -> Path:
    """The k-th small pack (0-based): another subset of whole lesions of the real 28 px pack each time."""
    from tests.support.data import PACK_28PX
    from tests.support.pipeline_packs import IMAGES_PER_CLASS, write_subset_pack

    if not (PACK_28PX / "HAM10000_metadata.csv").exists():
        raise SystemExit(f"soak: error: the real 28 px pack is missing: {PACK_28PX}")
    return write_subset_pack(PACK_28PX, work / "packs" / f"soak-pack-{k + 1}", IMAGES_PER_CLASS, seed=7 + k)


def run_conf() -> dict:
    from tests.support.recipes import SMALL_FORM

    return dict(SMALL_FORM)


def run_recipe(conf: dict) -> dict:
    """The recipe the DAG resolves for this conf (its params' defaults, the conf over them), as champion.json
    records it (through JSON)."""
    from dermaops.config import param_names, param_schema, recipe_values

    params = {name: param_schema(name)["default"] for name in param_names()} | conf
    return json.loads(json.dumps(recipe_values(params), sort_keys=True))


# -- restarts -------------------------------------------------------------------------------------------


@dataclass
class RestartPlan:
    """One restart kind per run, in turn; a worker restart waits for a run that must train."""

    kinds: list[str]
    turn: int = 0
    worker_waits: bool = False

    def pick(self, must_train: bool) -> str | None:
        if not self.kinds:
            return None
        if self.worker_waits:
            if must_train:
                self.worker_waits = False
                return "worker"
            if self.kinds == ["worker"]:
                return None
        kind = self.kinds[self.turn % len(self.kinds)]
        self.turn += 1
        if kind == "worker" and not must_train:
            self.worker_waits = True
            if self.kinds == ["worker"]:
                return None
            kind = self.kinds[self.turn % len(self.kinds)]
            self.turn += 1
        return kind

    def missed(self, kind: str) -> None:
        """The run skipped training after all, so the worker was not restarted: the next run that trains does it."""
        if kind == "worker":
            self.worker_waits = True


# -- the stack's APIs -----------------------------------------------------------------------------------


class Airflow:
    """The REST API of the stack, logging in again on 401 and riding out a restarting database (5xx, resets)."""

    def __init__(self, stack):
        self.stack = stack
        self.session = stack.api()

    def request(self, method: str, path: str, patience: float = 180, **kwargs):
        import requests

        deadline = time.monotonic() + patience
        while True:
            try:
                response = self.session.request(method, f"{self.stack.url}/api/v2{path}", timeout=30, **kwargs)
                if response.status_code == 401:
                    self.session = self.stack.api()
                    continue
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except (requests.RequestException, AssertionError) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path}: no answer within {patience:.0f} s ({problem})")
            time.sleep(3)

    def get(self, path: str, **kwargs) -> dict:
        response = self.request("GET", path, **kwargs)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()


def dag_path(dag_id: str, rest: str = "") -> str:
    return f"/dags/{dag_id}{rest}"


def task_states(airflow: Airflow, dag_id: str, run_id: str) -> dict[str, dict]:
    tis = airflow.get(dag_path(dag_id, f"/dagRuns/{run_id}/taskInstances"))["task_instances"]
    return {ti["task_id"]: ti for ti in tis}


def xcom(airflow: Airflow, dag_id: str, run_id: str, task_id: str):
    response = airflow.request(
        "GET", dag_path(dag_id, f"/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
    )
    return response.json().get("value") if response.status_code == 200 else None


def task_log(airflow: Airflow, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    path = dag_path(dag_id, f"/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}")
    response = airflow.request("GET", path, params={"full_content": "true"}, headers={"Accept": "application/json"})
    if response.status_code != 200:
        return ""
    content = response.json().get("content")
    if isinstance(content, str):
        return content
    return "\n".join(entry if isinstance(entry, str) else json.dumps(entry) for entry in content or [])


def wait_healthy(stack, timeout: float = 600) -> float:
    """Until every running service is healthy again (one-shots may have exited 0); returns the seconds waited."""
    started = time.monotonic()
    while True:
        out = stack.compose("ps", "--all", "--format", "json", timeout=60).stdout.strip()
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
        waiting = [
            f"{r['Service']} {r['State']} {r.get('Health') or ''}".strip()
            for r in rows
            if not (r["State"] == "running" and r.get("Health") in ("healthy", ""))
            and not (r["State"] == "exited" and r.get("ExitCode") == 0)
        ]
        if not waiting:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"services not healthy {timeout:.0f} s after a restart: {', '.join(waiting)}")
        time.sleep(3)


def stage_containers(network: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=dermaops.stage", "--filter", f"network={network}",
         "--format", "{{.Names}} {{.Status}} {{.Label \"dermaops.task-instance\"}}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.splitlines()


# -- S3 ---------------------------------------------------------------------------------------------------


class Bucket:
    """The stack's bucket as its admin sees it (MinIO's root user from the stack's env file), with a cache of
    the objects already hashed: (key, ETag) -> (sha256, size)."""

    def __init__(self, stack):
        import boto3
        from botocore.config import Config

        env = stack.secrets
        self.name = env.get("DERMAOPS_BUCKET") or "dermaops"
        self.client = boto3.client(
            "s3",
            endpoint_url=stack.s3_url,
            aws_access_key_id=env["MINIO_ROOT_USER"],
            aws_secret_access_key=env["MINIO_ROOT_PASSWORD"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10, "mode": "standard"}),
        )
        self.hashed: dict[tuple[str, str], tuple[str, int]] = {}
        self.bytes_hashed = 0

    def listing(self, prefix: str = "") -> dict[str, tuple[str, int]]:
        """key -> (ETag, size) of every object under prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return {o["Key"]: (o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", [])}

    def json(self, key: str):
        return json.loads(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def json_or_none(self, key: str):
        from botocore.exceptions import ClientError

        try:
            return self.json(key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def sha256(self, key: str, etag: str) -> tuple[str, int]:
        if (key, etag) not in self.hashed:
            digest, size = hashlib.sha256(), 0
            for chunk in self.client.get_object(Bucket=self.name, Key=key)["Body"].iter_chunks(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            self.hashed[(key, etag)] = (digest.hexdigest(), size)
            self.bytes_hashed += size
        return self.hashed[(key, etag)]

    def forget_hashes(self) -> None:
        """After an S3 restart: every object is hashed again, whatever its ETag says."""
        self.hashed.clear()


# -- the checks -----------------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    changed: bool
    restart: str | None = None
    restart_when: str = ""
    restart_s: float = 0.0
    s3_objects: int = 0
    run_id: str = ""
    state: str = ""
    dataset_version: str = ""
    expected: str = ""
    outcome: str = ""
    decision_reason: str = ""
    train_tries: int = 0
    resumed: bool | None = None
    run_s: float = 0.0
    total_s: float = 0.0
    checks_s: float = 0.0
    problems: list[dict] = field(default_factory=list)

    def problem(self, kind: str, detail: str) -> None:
        self.problems.append({"run": self.n, "kind": kind, "detail": detail})
        log(f"run {self.n}: PROBLEM ({kind}): {detail}")


def check_manifests(bucket: Bucket, run: Run) -> tuple[int, int]:
    """Every manifest.json's files against the bucket; (manifests, file entries) checked."""
    objects = bucket.listing()
    manifests = sorted(k for k in objects if k.rsplit("/", 1)[-1] == "manifest.json")
    entries = 0
    for key in manifests:
        prefix = key[: -len("manifest.json")]
        try:
            files = bucket.json(key).get("files")
        except ValueError as exc:
            run.problem("inconsistent", f"s3://{bucket.name}/{key} is not JSON ({exc})")
            continue
        if not isinstance(files, dict):
            run.problem("inconsistent", f"s3://{bucket.name}/{key} lists no files")
            continue
        for name, entry in files.items():
            entries += 1
            stored = objects.get(prefix + name)
            if stored is None:
                run.problem("lost_object", f"s3://{bucket.name}/{prefix}{name} (listed in {key}) is missing")
                continue
            sha256, size = bucket.sha256(prefix + name, stored[0])
            if (sha256, size) != (entry.get("sha256"), entry.get("size")):
                run.problem(
                    "inconsistent",
                    f"s3://{bucket.name}/{prefix}{name}: sha256 {sha256[:12]}, {size} bytes; {key} says "
                    f"{str(entry.get('sha256'))[:12]}, {entry.get('size')} bytes",
                )
    return len(manifests), entries


def check_registry(bucket: Bucket, run: Run, runs: list[Run]) -> dict | None:
    """champion.json against its model, its history entry and the history; returns champion.json."""
    from dermaops.promotion import Registry
    from dermaops.store import ArtifactStore, S3Uri

    registry = Registry(ArtifactStore(bucket.client), S3Uri(bucket.name, REGISTRY_PREFIX))
    state = registry.champion_state()
    if state.problem:
        run.problem("inconsistent", state.problem)
        return None
    history = registry.history()
    promoted = [h for h in history if h.get("decision") == "promoted"]
    record = state.record
    if record is None:
        if promoted:
            run.problem("inconsistent", f"no champion.json, but the history records {len(promoted)} promotions")
    else:
        if not promoted or promoted[-1].get("run_id") != record["run_id"]:
            last = promoted[-1].get("run_id") if promoted else None
            run.problem(
                "inconsistent", f"champion.json is run {record['run_id']}, the last promotion in the history {last}"
            )
        named = S3Uri.parse(record.get("history_uri") or f"s3://{bucket.name}/-")
        entry = bucket.json_or_none(named.key)
        if not entry or entry.get("decision") != "promoted" or entry.get("run_id") != record["run_id"]:
            run.problem("inconsistent", f"champion.json's history entry {named} does not record its promotion")
        elif (entry.get("challenger") or {}).get("model_sha256") != record["model_sha256"]:
            run.problem("inconsistent", f"champion.json's model_sha256 differs from its history entry {named}")
        model = S3Uri.parse(record["model_uri"])
        stored = bucket.listing(model.key).get(model.key)
        if stored is None:
            run.problem("lost_object", f"the champion's model {model} is missing")
        elif bucket.sha256(model.key, stored[0])[0] != record["model_sha256"]:
            run.problem("inconsistent", f"the champion's model {model} does not have champion.json's sha256")
    # One decision per trained run of the soak, none per skipped one.
    decisions: dict[str, int] = {}
    for h in history:
        decisions[h.get("run_id")] = decisions.get(h.get("run_id"), 0) + 1
    for r in runs:
        want = 1 if r.outcome in ("promoted", "refused") else 0
        got = decisions.get(r.run_id, 0)
        if r.run_id and r.outcome != "failed" and got != want:
            run.problem("inconsistent", f"the history holds {got} decisions for run {r.n} ({r.outcome}), not {want}")
    pending = bucket.listing(f"{REGISTRY_PREFIX}/pending/")
    if pending:
        run.problem("inconsistent", f"registry entries await approval: {sorted(pending)}")
    return record


# -- one run --------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, stack, work: Path):
        self.args = args
        self.stack = stack
        self.work = work
        self.conf = run_conf()
        self.recipe = run_recipe(self.conf)
        self.plan = RestartPlan(list(args.restarts))
        self.runs: list[Run] = []
        self.packs = 0
        self.manifests = self.entries = 0
        self.orphans = 0
        self.bucket: Bucket | None = None

    def start(self) -> None:
        from tests.support.airflow_env import DAG_ID

        self.dag_id = DAG_ID
        self.airflow = Airflow(self.stack)
        self.bucket = Bucket(self.stack)
        deadline = time.monotonic() + 300
        while self.airflow.request("GET", dag_path(DAG_ID)).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the DAG {DAG_ID} was not parsed within 300 s")
            time.sleep(3)
        # Switched on as an operator does; the schedule itself is off (USE_JOB_SCHEDULE=false), so no weekly run.
        response = self.airflow.request("PATCH", dag_path(DAG_ID), json={"is_paused": False})
        if response.status_code != 200:
            raise RuntimeError(f"cannot unpause {DAG_ID}: HTTP {response.status_code}: {response.text[:300]}")

    def restart(self, run: Run, kind: str, when: str) -> None:
        service = SERVICE[kind]
        log(f"run {run.n}: restarting {service} ({when})")
        before = self.bucket.listing() if kind == "s3" else None
        started = time.monotonic()
        self.stack.compose("restart", service, timeout=600)
        wait_healthy(self.stack)
        run.restart, run.restart_when, run.restart_s = kind, when, round(time.monotonic() - started, 1)
        log(f"run {run.n}: {service} back and healthy in {run.restart_s:.0f} s")
        if before is not None:
            after = self.bucket.listing()
            lost = sorted(k for k in before if k not in after)
            changed = sorted(k for k in before if k in after and after[k] != before[k])
            for key in lost[:20]:
                run.problem("lost_object", f"s3://{self.bucket.name}/{key} is gone after the S3 restart")
            if len(lost) > 20:
                run.problem("lost_object", f"... and {len(lost) - 20} more objects are gone after the S3 restart")
            for key in changed[:20]:
                run.problem("inconsistent", f"s3://{self.bucket.name}/{key} changed ETag or size over the S3 restart")
            self.bucket.forget_hashes()
            run.s3_objects = len(before)

    def one(self, n: int) -> Run:
        run = Run(n, changed_data(n))
        started = time.monotonic()
        champion = self.bucket.json_or_none(f"{REGISTRY_PREFIX}/champion.json")
        previous = next((r.dataset_version for r in reversed(self.runs) if r.dataset_version), None)
        # A run must train unless its data and recipe are the champion's; with new data it surely does.
        must_train = (
            run.changed
            or champion is None
            or champion.get("dataset_version") != previous
            or champion.get("recipe") != self.recipe
        )
        kind = self.plan.pick(must_train)
        if run.changed:
            pack = make_pack(self.work, self.packs)
            self.packs += 1
            source = self.stack.run("seed", str(pack)).stdout.strip().splitlines()[-1]
            log(f"run {n}: new data seeded: {source}")
        if kind in BEFORE_RUN:
            self.restart(run, kind, "before the run")

        response = self.airflow.request(
            "POST", dag_path(self.dag_id, "/dagRuns"), json={"logical_date": None, "conf": self.conf}
        )
        if response.status_code != 200:
            raise RuntimeError(f"trigger refused: HTTP {response.status_code}: {response.text[:300]}")
        run.run_id = response.json()["dag_run_id"]
        triggered = time.monotonic()
        log(f"run {n}: triggered {run.run_id} ({'new' if run.changed else 'same'} data, restart: {kind or 'none'})")
        self.follow(run, kind, triggered)
        run.run_s = round(time.monotonic() - triggered, 1)
        checks = time.monotonic()
        if run.state in ("success", "failed"):
            self.judge(run, champion)
        self.check(run)
        run.checks_s = round(time.monotonic() - checks, 1)
        run.total_s = round(time.monotonic() - started, 1)
        log(
            f"run {n}: {run.state}, {run.outcome} (expected {run.expected}) in {run.run_s:.0f} s; "
            f"checks {run.checks_s:.0f} s; {len(run.problems)} problems"
        )
        return run

    def follow(self, run: Run, kind: str | None, triggered: float) -> None:
        """Poll the run to its end, restarting the worker or the scheduler on the way when it is their turn."""
        from dermaops.pipeline import run_key

        checkpoint = f"runs/{run_key(run.run_id)}/models/cnn/checkpoints/last.pt"
        pending = kind if kind in ("worker", "scheduler") else None
        while True:
            state = self.airflow.get(dag_path(self.dag_id, f"/dagRuns/{run.run_id}"))["state"]
            if state in ("success", "failed"):
                run.state = state
                break
            if time.monotonic() - triggered > self.args.run_timeout:
                run.state = state
                tis = task_states(self.airflow, self.dag_id, run.run_id)
                states = {t: ti["state"] for t, ti in tis.items()}
                run.problem("stuck", f"{run.run_id} still {state} after {self.args.run_timeout:.0f} s: {states}")
                break
            if pending:
                tis = task_states(self.airflow, self.dag_id, run.run_id)
                if pending == "worker":
                    train = tis.get("train", {}).get("state")
                    if train == "running" and self.bucket.listing(checkpoint):
                        self.restart(run, "worker", "during train, after its first epoch checkpoint")
                        pending = None
                    elif train == "skipped":
                        pending = None  # nothing to train: the worker waits for the next run that trains
                elif any(ti["state"] == "running" for ti in tis.values()):
                    running = sorted(t for t, ti in tis.items() if ti["state"] == "running")
                    self.restart(run, "scheduler", f"during the run, while {', '.join(running)} ran")
                    pending = None
            time.sleep(1 if pending else 5)
        if kind in ("worker", "scheduler") and run.restart != kind:
            self.plan.missed(kind)
            log(f"run {run.n}: no {kind} restart in this run (nothing to train); it moves to the next run")

    def judge(self, run: Run, champion: dict | None) -> None:
        """Did the run end as it had to: trained and promoted or refused, or skipped?"""
        tis = task_states(self.airflow, self.dag_id, run.run_id)
        states = {t: ti["state"] for t, ti in tis.items()}
        ingest = xcom(self.airflow, self.dag_id, run.run_id, "ingest") or {}
        run.dataset_version = ingest.get("dataset_version", "")
        run.train_tries = tis.get("train", {}).get("try_number") or 0
        earlier = [r.dataset_version for r in self.runs if r.dataset_version]
        if run.changed and run.dataset_version in earlier:
            run.problem("outcome", f"new data was seeded, but the dataset version {run.dataset_version} is not new")
        if not run.changed and earlier and run.dataset_version != earlier[-1]:
            run.problem(
                "outcome", f"the same source gave another dataset version: {earlier[-1]} -> {run.dataset_version}"
            )
        same = (
            champion is not None
            and champion.get("dataset_version") == run.dataset_version
            and champion.get("recipe") == self.recipe
        )
        run.expected = "skipped" if same else "trained"
        if run.state != "success":
            run.outcome = "failed"
            failed = {t: s for t, s in states.items() if s not in ("success", "skipped")}
            run.problem("outcome", f"{run.run_id} ended {run.state}: {failed}")
            return
        if all(states.get(t) == "skipped" for t in SKIPPED_BY_SHORT_CIRCUIT):
            run.outcome = "skipped"
        else:
            evaluate = xcom(self.airflow, self.dag_id, run.run_id, "evaluate") or {}
            run.outcome = evaluate.get("decision", "?")
            run.decision_reason = str(evaluate.get("promotion_reason", ""))[:200]
        if (run.expected, run.outcome) not in (("skipped", "skipped"), ("trained", "promoted"), ("trained", "refused")):
            run.problem("outcome", f"expected {run.expected}, got {run.outcome}: {states}")
        if run.restart == "worker":
            # The retry after the restart must have resumed from the epoch checkpoint, not started over.
            logs = (task_log(self.airflow, self.dag_id, run.run_id, "train", n) for n in range(2, run.train_tries + 1))
            run.resumed = any("resuming from epoch" in text for text in logs)
            if not run.resumed:
                run.problem("outcome", f"train did not resume from its checkpoint ({run.train_tries} tries)")
        after = self.bucket.json_or_none(f"{REGISTRY_PREFIX}/champion.json")
        champion_run = (after or {}).get("run_id")
        if run.outcome == "promoted" and champion_run != run.run_id:
            run.problem("inconsistent", f"evaluate promoted {run.run_id}, but champion.json names {champion_run}")
        before = (champion or {}).get("run_id")
        if run.outcome in ("refused", "skipped") and champion_run != before:
            run.problem(
                "inconsistent", f"champion.json changed from run {before} to {champion_run} in a {run.outcome} run"
            )

    def check(self, run: Run) -> None:
        # Lost or stuck: every soak run is still listed, in the final state it ended in.
        listed = self.airflow.get(dag_path(self.dag_id, "/dagRuns"), params={"limit": 100})["dag_runs"]
        states = {r["dag_run_id"]: r["state"] for r in listed}
        for r in [*self.runs, run]:
            if r.run_id not in states:
                run.problem("lost_run", f"run {r.n} ({r.run_id}) is no longer listed")
            elif states[r.run_id] != r.state:
                run.problem("lost_run", f"run {r.n} ({r.run_id}) changed state: {r.state} -> {states[r.run_id]}")
        others = sorted(rid for rid, s in states.items() if s not in ("success", "failed") and rid != run.run_id)
        if others:
            run.problem("stuck", f"runs not finished: {others}")
        # Orphans: the stage containers go with their task (auto_remove); allow the engine a moment.
        network = self.stack.settings["DERMAOPS_DOCKER_NETWORK"]
        deadline = time.monotonic() + 30
        while (left := stage_containers(network)) and time.monotonic() < deadline:
            time.sleep(2)
        for line in left:
            self.orphans += 1
            run.problem("orphan", f"stage container left: {line}")
        self.manifests, entries = check_manifests(self.bucket, run)
        self.entries += entries
        check_registry(self.bucket, run, [*self.runs, run])


# -- the summary and the report ---------------------------------------------------------------------------


def summarize(soak: Soak, args, up_s: float, total_s: float, interrupted: str) -> dict:
    runs = soak.runs
    problems = [p for r in runs for p in r.problems]

    def count(kind: str) -> int:
        return sum(1 for p in problems if p["kind"] == kind)

    by_outcome: dict[str, int] = {}
    for r in runs:
        by_outcome[r.outcome or r.state or "?"] = by_outcome.get(r.outcome or r.state or "?", 0) + 1
    restarts = {
        kind: {
            "done": sum(1 for r in runs if r.restart == kind),
            "survived": sum(1 for r in runs if r.restart == kind and not r.problems),
        }
        for kind in args.restarts
    }
    return {
        "benchmark": "soak",
        "recipe": RECIPE_NAME,
        "conf": soak.conf,
        "runs": {
            "requested": args.runs,
            "completed": sum(1 for r in runs if r.state in ("success", "failed")),
            "by_outcome": by_outcome,
        },
        "restarts": restarts,
        "objects_checked": len({key for key, _ in soak.bucket.hashed}) if soak.bucket else 0,
        "manifest_entries_checked": soak.entries,
        "manifests": soak.manifests,
        "bytes_hashed": soak.bucket.bytes_hashed if soak.bucket else 0,
        "lost": count("lost_run") + count("lost_object"),
        "lost_runs": count("lost_run"),
        "lost_objects": count("lost_object"),
        "inconsistent": count("inconsistent"),
        "outcome_problems": count("outcome"),
        "stuck": count("stuck"),
        "orphans": soak.orphans,
        "wall_s": {
            "stack_up": round(up_s, 1),
            "per_run": [r.total_s for r in runs],
            "per_run_trigger_to_end": [r.run_s for r in runs],
            "total": round(total_s, 1),
        },
        "interrupted": interrupted or None,
        "passed": not problems and not interrupted and len(runs) == args.runs,
    }


def write_report(path: Path, summary: dict, soak: Soak, logs: Path | None) -> None:
    lines = [
        f"# Soak test of the compose deployment ({dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"- Machine: {os.cpu_count()} CPU cores; stack `{PROJECT}` (scripts/stack up, one Celery worker)",
        f"- Recipe: {RECIPE_NAME}: `{json.dumps(soak.conf)}`",
        f"- Runs: {summary['runs']['completed']} of {summary['runs']['requested']} completed; "
        f"by outcome {summary['runs']['by_outcome']}",
        f"- Stack up {summary['wall_s']['stack_up']:.0f} s; everything {summary['wall_s']['total']:.0f} s "
        f"({summary['wall_s']['total'] / 60:.1f} min)",
        f"- Verdict: {'PASSED' if summary['passed'] else 'FAILED'}"
        + (f" (interrupted: {summary['interrupted']})" if summary["interrupted"] else ""),
        *([f"- Services' logs: {logs}"] if logs else []),
        "",
        "| run | data | dataset version | restart | when | restart s | expected | outcome | train tries | "
        "run s | checks s | total s | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in soak.runs:
        lines.append(
            f"| {r.n} | {'new' if r.changed else 'same'} | {r.dataset_version or '-'} | {r.restart or '-'} | "
            f"{r.restart_when or '-'} | {r.restart_s:.0f} | {r.expected or '-'} | {r.outcome or r.state or '-'} | "
            f"{r.train_tries} | {r.run_s:.0f} | {r.checks_s:.0f} | {r.total_s:.0f} | {len(r.problems)} |"
        )
    decided = [r for r in soak.runs if r.decision_reason]
    if decided:
        lines += ["", "## The gate's decisions", ""]
        lines += [f"- run {r.n} ({r.outcome}): {r.decision_reason}" for r in decided]
    problems = [p for r in soak.runs for p in r.problems]
    lines += ["", "## Problems", ""]
    lines += [f"- run {p['run']}, {p['kind']}: {p['detail']}" for p in problems] or ["None."]
    lines += ["", "## Summary", "", "```json", json.dumps(summary, indent=2), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "runs": [r.__dict__ for r in soak.runs]}, indent=2, default=str)
    )


# -- main -------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    from tests.support.stack import Stack

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report = args.report or ROOT / "out" / "soak" / f"soak-{stamp}.md"
    work = Path(tempfile.mkdtemp(prefix="dermaops-soak-"))
    stack = Stack(work, project=PROJECT, settings={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "false"})
    if stack.is_up:
        print(
            f"soak: error: a stack {PROJECT} is already up: take it down first (scripts/stack down -v)", file=sys.stderr
        )
        return 1
    soak = Soak(args, stack, work)
    started = time.monotonic()
    up_s = 0.0
    interrupted = ""
    logs = None
    try:
        log(f"scripts/stack up ({PROJECT}); {args.runs} runs, restarts: {' '.join(args.restarts) or 'none'}")
        stack.run("up")
        up_s = time.monotonic() - started
        log(f"stack up in {up_s:.0f} s")
        soak.start()
        for n in range(1, args.runs + 1):
            run = soak.one(n)
            soak.runs.append(run)
            if any(p["kind"] == "stuck" for p in run.problems):
                interrupted = f"run {n} is stuck: the next ones would queue behind it (max_active_runs=1)"
                break
    except KeyboardInterrupt:
        interrupted = "interrupted by the user"
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
        # Stack.run's message is "scripts/stack up failed (1):" and the command's stderr: keep its last line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        interrupted = (f"{lines[0]} {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0])[:500]
        log(f"stopped: {interrupted}")
    finally:
        if stack.is_up:
            report.parent.mkdir(parents=True, exist_ok=True)
            logs = stack.save_logs(report.with_suffix(".compose.log"))
            if args.keep:
                log(
                    f"stack kept: DERMAOPS_ENV_FILE={stack.env_file} DERMAOPS_STACK_PROJECT={PROJECT} "
                    f"DERMAOPS_DOCKER_NETWORK={PROJECT} scripts/stack down -v   (UI {stack.url}, S3 {stack.s3_url})"
                )
            else:
                stack.run("down", "-v", timeout=900)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total_s = time.monotonic() - started
    summary = summarize(soak, args, up_s, total_s, interrupted)
    summary["report"] = str(report)
    write_report(report, summary, soak, logs)
    log(f"report: {report}")
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
