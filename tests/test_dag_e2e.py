"""The whole DAG end to end with `airflow dags test`: real stages on a small real pack, the loopback S3,
the loopback Slack Web API, an isolated Airflow with SQLite.

- local mode: every task a subprocess on the worker;
- failure path: data that fails validation stops the pipeline, notify reports it, the champion stays,
  in local mode and in docker mode (a stage container from the images scripts/build-images makes).

A successful run in docker mode is tests/test_deployment.py's: every stage a container, started by
Celery workers of the compose stack.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dermaops import access, pipeline
from dermaops.config import param_names, param_schema, recipe_values
from dermaops.dataset import CLASSES
from dermaops.embedded_s3 import DUMMY_ENV
from dermaops.store import S3Uri
from dermaops_runner.templating import run_key

from tests.support.airflow_env import AIRFLOW, ROOT
from tests.support.slack_api import CHANNEL, TOKEN, block_text

STAGES = ("ingest", "validate", "split", "changes", "retrain_needed", "train_baseline", "train", "evaluate")
# Without require_approval (the default) the approval short circuit skips the approval and promote.
NO_APPROVAL = {"approval_needed": "success", "approve": "skipped", "promote": "skipped"}
# Tiny but real: resnet18 at 28 px, one epoch per phase of 200 draws from a 200-image subset (quick-cpu's
# 4,000 draws per epoch are for the whole pack), a small forest. A model trained on a subset is never promoted
# (allow_subset_promotion is off): the run succeeds and says why it was refused.
QUICK_CONF = {
    "arch": "resnet18",
    "image_size": 28,
    "epochs": 1,
    "finetune_epochs": 1,
    "batch_size": 64,
    "max_train_images": 200,
    "epoch_images": 200,
    "baseline_trees": 20,
    "promotion_margin": 0.0,
    "mel_recall_floor": 0.0,
}


def dags_test(airflow_env, conf: dict, env: dict) -> tuple[subprocess.CompletedProcess, str, float]:
    started = time.monotonic()
    proc = airflow_env.run("dags", "test", "dermaops_ham10000", "--conf", json.dumps(conf), env=env, check=False)
    seconds = time.monotonic() - started
    run_id = airflow_env.latest_run_id()
    log = airflow_env.home / f"{run_key(run_id)}.log"
    log.write_text(proc.stdout + proc.stderr)
    print(f"airflow dags test: exit {proc.returncode} in {seconds:.1f} s, output in {log}")
    return proc, run_id, seconds


def task_seconds(airflow_env, run_id: str) -> dict[str, float]:
    return {t: round(ti["duration"] or 0.0, 1) for t, ti in airflow_env.task_instances(run_id).items()}


def pack_rows(pack: Path) -> int:
    with open(pack / "HAM10000_metadata.csv", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


@pytest.fixture
def dag_env(s3_server, slack_api, bucket) -> dict[str, str]:
    """What the Airflow process needs: the bucket, the loopback S3 and Slack (the worker's environment)."""
    return {**s3_server.env, **slack_api.env(), "DERMAOPS_BUCKET": bucket.bucket}


def assert_successful_run(
    airflow_env, store, bucket: S3Uri, slack_api, run_id: str, n_images: int, image_size: int = 28
) -> None:
    assert airflow_env.run_state(run_id) == "success"
    assert airflow_env.task_states(run_id) == {**{t: "success" for t in (*STAGES, "notify", "outcome")}, **NO_APPROVAL}
    runs = bucket.join("runs", run_key(run_id))
    xcom = airflow_env.xcoms(run_id)

    ingest = xcom["ingest"]
    assert ingest["dataset_uri"].startswith(f"s3://{bucket.bucket}/datasets/ham10000/")
    assert ingest["n_images"] == n_images and ingest["n_rows"] == n_images
    assert store.exists(S3Uri.parse(ingest["dataset_uri"]).join("manifest.json"))

    assert xcom["validate"]["success"] is True and xcom["validate"]["n_images"] == n_images
    assert xcom["split"]["split_uri"] == str(runs.join("split")) and xcom["split"]["lesion_overlap"] == 0
    assert sum(xcom["split"]["counts"].values()) == n_images
    assert xcom["train_baseline"]["model_uri"] == str(runs.join("models", "baseline", "baseline.joblib"))
    train = xcom["train"]
    assert (train["arch"], train["image_size"], train["model_uri"]) == (
        "resnet18",
        image_size,
        str(runs.join("models", "cnn", "cnn.pt")),
    )
    evaluation = xcom["evaluate"]
    for metric in ("accuracy", "macro_f1", "weighted_f1", "mel_recall"):
        assert 0.0 <= evaluation[metric] <= 1.0, metric
    assert evaluation["promoted"] is False and evaluation["decision"] == "refused"
    assert "trained on a subset (max_train_images=" in evaluation["promotion_reason"]

    assert xcom["changes"]["retrain"] is True and xcom["changes"]["reason"] == "no champion yet"
    for prefix in ("validation", "split", "changes", "models/baseline", "models/cnn", "evaluation", "notify"):
        assert store.exists(runs.join(prefix, "manifest.json")), prefix
    for name in ("metrics.json", "confusion_matrix.png", "gradcam_mel.png", "report.md"):
        assert store.exists(runs.join("evaluation", name)), name

    assert not store.exists(bucket.join("registry", "ham10000", "champion.json"))

    notify = xcom["notify"]
    assert (notify["outcome"], notify["slack"]) == ("success", "posted")
    # The decision and its reason are on the run in the UI: the notify task's XCom.
    assert notify["promotion"] == {"promoted": False, "reason": evaluation["promotion_reason"]}
    report = store.get_bytes(runs.join("notify", "report.md")).decode()
    assert "Outcome: **success**" in report and ingest["dataset_version"] in report

    [message] = slack_api.messages  # no failure alert on success
    assert "succeeded" in message["blocks"][0]["text"]["text"]
    text = block_text(message["blocks"])
    assert ingest["dataset_version"] in text and f"`{run_id}`" in text
    assert f"{evaluation['macro_f1']:.4f}" in text and f"{evaluation['mel_recall']:.4f}" in text
    assert "*not promoted*" in text and "trained on a subset" in text
    assert str(runs.join("notify", "report.md")) in text
    assert all(f"`{t}` success" in text for t in STAGES)

    # One event per asset: ingest's dataset version, evaluate's decision (promote, the champion's other
    # producer, was skipped).
    events = airflow_env.asset_events(run_id)
    lineage = {event["name"]: event["extra"] for event in events}
    dataset = f"s3://{bucket.bucket}/datasets/ham10000"
    champion = f"s3://{bucket.bucket}/registry/ham10000/champion.json"
    assert sorted(event["name"] for event in events) == [dataset, champion]
    assert lineage[dataset]["dataset_version"] == ingest["dataset_version"]
    assert lineage[champion]["promoted"] is False


@pytest.mark.slow
def test_local_mode_runs_every_stage(airflow_env, small_pack_200px, least_privilege_s3, slack_api):
    """The whole DAG on a subset of the 200 px pack with its lesion masks: validate checks the masks, train
    keeps the 4:3 frame, evaluate judges Grad-CAM against the real masks.

    On an S3 that enforces least privilege (dermaops.access): each stage gets only its role's key, from
    the connection dermaops_s3_<role>, and the Airflow process itself has no key that works (the
    session's dummy one), so a stage handed the wrong key, or none, fails the run."""
    lp = least_privilege_s3
    store, bucket = lp.store(), lp.bucket
    connections = {name: value for name, value in lp.env.items() if name.startswith("AIRFLOW_CONN_")}
    assert len(connections) == len(access.ROLES)
    dag_env = {
        **slack_api.env(),
        **connections,
        "DERMAOPS_BUCKET": bucket.bucket,
        "DERMAOPS_S3_ENDPOINT_URL": lp.env["DERMAOPS_S3_ENDPOINT_URL"],
        **{name: DUMMY_ENV[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    }
    conf = {**QUICK_CONF, "geometry": "aspect", "image_size": 64, "source": str(small_pack_200px)}
    proc, run_id, seconds = dags_test(airflow_env, conf, {**dag_env, "DERMAOPS_RUNNER": "local"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    print("local mode task seconds:", task_seconds(airflow_env, run_id))
    assert dag_env["SLACK_BOT_TOKEN"] not in proc.stdout + proc.stderr
    # Each stage got its role's key: the train role's for train, the registry role's for evaluate.
    for role in {pipeline.stage(name).s3_role for name in pipeline.RETRAIN}:
        assert f"S3 credentials from connection dermaops_s3_{role} (key dermaops-{role})" in proc.stdout + proc.stderr
    n_images = pack_rows(small_pack_200px)
    assert_successful_run(airflow_env, store, bucket, slack_api, run_id, n_images, image_size=64)

    # The masks travelled: stored with the version, checked by validate, used to judge Grad-CAM.
    xcom = airflow_env.xcoms(run_id)
    assert xcom["ingest"]["n_masks"] == n_images and xcom["validate"]["masks"]["present"] is True
    assert xcom["train"]["geometry"] == "aspect"
    metrics = store.get_json(bucket.join("runs", run_key(run_id), "evaluation", "metrics.json"))
    assert metrics["model_meta"]["input_shape"] == [48, 64] and metrics["model_meta"]["geometry"] == "aspect"
    cam = metrics["gradcam"]
    assert cam["mask_source"] == "lesion segmentations" and cam["overall"]["n"] == metrics["test"]["n"]
    assert set(cam["per_class"]) == set(CLASSES) and 0 <= cam["per_class"]["mel"]["pointing_hit_rate"] <= 1

    # scripts/run's account of the run, read through Airflow's CLI (dermaops.devrun), says the same.
    outcome = subprocess.run(
        [sys.executable, "-m", "dermaops.devrun", "outcome", "dermaops_ham10000", str(airflow_env.home)],
        capture_output=True,
        text=True,
        env={**airflow_env.env, **dag_env, "PATH": f"{Path(AIRFLOW).parent}:{airflow_env.env.get('PATH', '')}"},
        cwd=airflow_env.home,
        check=True,
    ).stdout
    assert f"run {run_id}: success" in outcome
    assert all(re.search(rf"^  {task}\s+success\s", outcome, re.M) for task in (*STAGES, "notify")), outcome
    # Its task table in the DAG's order (not by start time, where the parallel trainings interleave).
    listed = re.findall(r"^  (\w+)\s+(?:success|skipped)\s", outcome, re.M)
    assert listed == [*STAGES, *NO_APPROVAL, "notify", "outcome"], outcome


@pytest.mark.slow
def test_unchanged_data_and_recipe_skip_training_unless_forced(
    airflow_env, small_pack, dag_env, store, bucket, slack_api, run_stage
):
    """A run on the dataset version and the recipe the champion was trained with skips train, train_baseline
    and evaluate (Airflow's short circuit) and says so; force_retrain decides to train."""
    env = {**dag_env, "DERMAOPS_RUNNER": "local"}
    conf = {**QUICK_CONF, "source": str(small_pack)}
    datasets = f"s3://{bucket.bucket}/datasets/ham10000"
    registry = bucket.join("registry", "ham10000")
    champion_uri = registry.join("champion.json")
    version = run_stage("ingest", "--source", str(small_pack), "--datasets", datasets).summary["dataset_version"]
    # What a promotion of this data with this recipe leaves in champion.json (dermaops.promotion records
    # dataset_version and the recipe evaluate was given; the DAG renders both from one macro). Training and
    # promoting a model first would take this test past its time on a shared 2-core machine.
    recipe = recipe_values({**{name: param_schema(name)["default"] for name in param_names()}, **conf})
    assert (recipe["epochs"], recipe["image_size"], recipe["finetune_lr"]) == (1, 28, 3e-4)  # blank: the recipe's
    record = {"run_id": "an-earlier-run", "model_uri": "s3://x/cnn.pt", "model_sha256": "0" * 64}
    store.put_json(champion_uri, {**record, "dataset_version": version, "recipe": recipe})
    champion = store.get_bytes(champion_uri)

    proc, run_id, seconds = dags_test(airflow_env, conf, env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"unchanged run: {seconds:.0f} s; task seconds {task_seconds(airflow_env, run_id)}")
    assert airflow_env.run_state(run_id) == "success"
    assert airflow_env.task_states(run_id) == {
        "ingest": "success",
        "validate": "success",
        "split": "success",
        "changes": "success",
        "retrain_needed": "success",
        "train_baseline": "skipped",
        "train": "skipped",
        "evaluate": "skipped",
        "approval_needed": "skipped",
        "approve": "skipped",
        "promote": "skipped",
        "notify": "success",
        "outcome": "success",
    }
    xcom = airflow_env.xcoms(run_id)
    changes = xcom["changes"]
    assert changes["retrain"] is False and changes["champion_run_id"] == "an-earlier-run"
    assert changes["reason"].startswith("no new data; champion unchanged")
    assert xcom["notify"]["promotion"] == {"promoted": False, "reason": changes["reason"]}
    runs = bucket.join("runs", run_key(run_id))
    assert not store.exists(runs.join("models", "cnn", "manifest.json"))
    assert store.get_bytes(champion_uri) == champion
    [message] = slack_api.messages
    text = block_text(message["blocks"])
    assert "no new data; champion unchanged" in text and "`train` skipped" in text
    report = store.get_bytes(runs.join("notify", "report.md")).decode()
    assert "Training skipped, no new data; champion unchanged" in report

    # force_retrain (rendered as --force, tests/test_dag_integrity.py) makes the same check say "train";
    # another recipe does too, naming what changed.
    argv = ["--dataset", xcom["ingest"]["dataset_uri"], "--registry", str(registry), "--out", str(runs.join("c"))]
    forced = run_stage("changes", *argv, "--recipe", json.dumps(recipe), "--force").summary
    assert (forced["retrain"], forced["reason"]) == (True, "force_retrain is on")
    other = run_stage("changes", *argv, "--recipe", json.dumps({**recipe, "epochs": 2})).summary
    assert other["retrain"] is True and "epochs: 1 -> 2" in other["reason"]


@pytest.mark.slow
def test_invalid_data_stops_before_training_and_is_reported(
    airflow_env, invalid_pack, dag_env, store, bucket, slack_api
):
    champion_uri = bucket.join("registry", "ham10000", "champion.json")
    earlier = json.dumps({"run_id": "an-earlier-run", "model_uri": "s3://x/cnn.pt", "model_sha256": "0" * 64}).encode()
    store.put_bytes(champion_uri, earlier)

    # Slack through an Airflow connection this time (the deployment's way), not the worker's environment.
    slack_connection = {
        "conn_type": "slack",
        "password": TOKEN,
        "extra": {"channel": CHANNEL, "base_url": slack_api.url},
    }
    env = {**dag_env, "SLACK_BOT_TOKEN": "", "DERMAOPS_SLACK_CHANNEL": "", "DERMAOPS_SLACK_API_URL": ""}
    env |= {"AIRFLOW_CONN_SLACK_API_DEFAULT": json.dumps(slack_connection), "DERMAOPS_RUNNER": "local"}

    proc, run_id, _ = dags_test(airflow_env, {**QUICK_CONF, "source": str(invalid_pack)}, env)

    assert proc.returncode != 0 and "DagRun failed" in proc.stderr
    assert airflow_env.run_state(run_id) == "failed"
    assert airflow_env.task_states(run_id) == {
        "ingest": "success",
        "validate": "failed",
        "split": "upstream_failed",
        "changes": "upstream_failed",
        "retrain_needed": "upstream_failed",
        "train_baseline": "upstream_failed",
        "train": "upstream_failed",
        "evaluate": "upstream_failed",
        "approval_needed": "upstream_failed",
        "approve": "upstream_failed",
        "promote": "upstream_failed",
        "notify": "success",
        "outcome": "success",  # the failed stage fails the run, through promote; the alert names it
    }, proc.stdout[-8000:]
    # A validation failure is not retried: the same data fails the same way.
    assert airflow_env.task_instances(run_id)["validate"]["try_number"] == 1
    error = airflow_env.xcoms(run_id, key="error")["validate"]
    assert error.startswith("dermaops validate: error:") and "dx" in error and "xyz" in error

    runs = bucket.join("runs", run_key(run_id))
    assert not store.exists(runs.join("split", "manifest.json"))
    assert store.get_bytes(champion_uri) == earlier  # the champion is unchanged

    report, alert = slack_api.messages  # notify's run report, then the DAG failure callback's alert
    assert "failed" in report["blocks"][0]["text"]["text"]
    text = block_text(report["blocks"])
    assert f":x: `validate` failed: {error}" in text
    assert ":no_entry_sign: `train` upstream_failed" in text
    assert "no decision (evaluation did not run)" in text
    assert "🚨" in alert["text"] and run_id in alert["text"]
    assert "`validate`" in block_text(alert["blocks"])


@pytest.fixture(scope="session")
def dermaops_images() -> dict[str, str]:
    """The data and torch images, built offline by the project's own scripts (cached by their inputs)."""
    subprocess.run([str(ROOT / "scripts" / "docker-engine")], check=True, timeout=600)
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-images"), "data", "torch"],
        check=True,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    tags = built.stdout.split()
    data = next(t for t in tags if t.startswith("dermaops-data:"))
    torch = next(t for t in tags if t.startswith("dermaops-torch:"))
    return {"DERMAOPS_DATA_IMAGE": data, "DERMAOPS_TORCH_IMAGE": torch}


@pytest.mark.slow
@pytest.mark.docker
def test_docker_mode_failure_is_reported_and_alerted(
    airflow_env, dermaops_images, invalid_pack, dag_env, store, bucket, slack_api
):
    """A stage that fails inside its container: exit 2 from the container fails the task without a retry,
    its one-line reason reaches the XCom, notify's report and Slack, and the DAG failure alert fires."""
    source = bucket.join("sources", "invalid-pack")
    for path in invalid_pack.iterdir():
        store.put_file(source.join(path.name), path)
    env = {**dag_env, **dermaops_images, "DERMAOPS_RUNNER": "docker", "DERMAOPS_DOCKER_NETWORK": "host"}

    proc, run_id, _ = dags_test(airflow_env, {**QUICK_CONF, "source": str(source)}, env)

    assert proc.returncode != 0 and airflow_env.run_state(run_id) == "failed"
    states = airflow_env.task_states(run_id)
    assert (states["ingest"], states["validate"], states["evaluate"], states["notify"]) == (
        "success",
        "failed",
        "upstream_failed",
        "success",
    ), proc.stdout[-8000:]
    assert airflow_env.task_instances(run_id)["validate"]["try_number"] == 1
    error = airflow_env.xcoms(run_id, key="error")["validate"]
    assert error.startswith("dermaops validate: error:") and "critical expectation" in error
    report_md = store.get_bytes(bucket.join("runs", run_key(run_id), "notify", "report.md")).decode()
    assert "Outcome: **failed**" in report_md and error in report_md
    report, alert = slack_api.messages
    assert f":x: `validate` failed: {error}" in block_text(report["blocks"])
    assert "🚨" in alert["text"] and run_id in alert["text"]
    # No stage container is left behind (auto_remove="force").
    left = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"ancestor={dermaops_images['DERMAOPS_DATA_IMAGE']}", "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert left.stdout.strip() == ""


TINY_NOTIFY_DAG = """
import datetime as dt

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, TriggerRule
from dermaops_runner import stage_task
from dermaops_runner.marks import outcome_task

with DAG(dag_id="tiny_notify", schedule=None, start_date=dt.datetime(2026, 1, 5, tzinfo=dt.UTC)) as dag:
    work = EmptyOperator(task_id="work")
    notify = stage_task(
        "notify",
        ["--run-id", "{{ run_id }}", "--states", "{}", "--report-out", "s3://%(bucket)s/runs/tiny/notify"],
        retries=2,
        retry_delay=dt.timedelta(seconds=0),
        trigger_rule=TriggerRule.ALL_DONE,
    )
    notify.is_teardown = True
    work >> notify
    if %(with_outcome)s:
        notify >> outcome_task()
"""


@pytest.mark.parametrize("with_outcome", [True, False])
def test_slack_down_through_notifys_retries_shows_on_the_run(
    with_outcome, airflow_env, dag_env, store, bucket, tmp_path
):
    """The retrain DAG's notify and outcome (tests/test_dag_integrity.py checks their settings) in a DAG of
    their own, with Slack unreachable: exit 3 is retried, and when every try failed the outcome task fails
    the run. Without it (a teardown notify alone, the DAG before issue 19) the run was green while the
    message was lost."""
    from dermaops.embedded_s3 import free_port

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "tiny_notify.py").write_text(TINY_NOTIFY_DAG % {"bucket": bucket.bucket, "with_outcome": with_outcome})
    down = f"http://127.0.0.1:{free_port()}/api/"  # nothing listens there
    env = {
        **dag_env,
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "DERMAOPS_RUNNER": "local",
        "DERMAOPS_SLACK_API_URL": down,
    }
    proc = airflow_env.run("dags", "test", "tiny_notify", env=env, check=False, timeout=600)
    run_id = airflow_env.latest_run_id("tiny_notify")
    tis = airflow_env.task_instances(run_id, dag_id="tiny_notify")
    states, tries = {t: ti["state"] for t, ti in tis.items()}, tis["notify"]["try_number"]
    expected = {"work": "success", "notify": "failed", **({"outcome": "failed"} if with_outcome else {})}
    assert states == expected, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert tries == 3  # the first try and 2 retries: exit 3 (Slack unreachable) is transient
    assert store.exists(bucket.join("runs", "tiny", "notify", "report.md"))  # the report is written each try
    assert airflow_env.run_state(run_id, dag_id="tiny_notify") == ("failed" if with_outcome else "success")
