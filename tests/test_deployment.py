"""The deployment, used as a user uses it: `scripts/stack up` with two Celery workers (one serving the
default queue, one the gpu queue), a real headless Chromium logging in, unpausing the DAG and
triggering a tiny recipe through the trigger form's own fields, then the run checked end to end
through the REST API, the stack's S3 and the Slack stand-in, with one fault (the gpu worker stopped
while `train` runs) and `scripts/stack down -v` leaving nothing behind.

Slow (minutes; cold image builds are scripts/build-images'), needs Docker. Artifacts (screenshots,
the stack's env file) go under the test's tmp folder; their paths are printed.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from dermaops.pipeline import RETRAIN, run_key
from dermaops.pipeline import STAGES as REGISTRY
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.airflow_env import DAG_ID
from tests.support.slack_api import CHANNEL, TOKEN, SlackApiServer, block_text
from tests.support.stack import Stack, chromium, docker_bridge_gateway, wait_for

pytestmark = [pytest.mark.deployment, pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

SOURCE_PREFIX = "sources/ham10000-28px"
# Every task of the run: the stages, and the short-circuit that skips training when nothing changed
# (it runs in the worker itself, on the default queue).
STAGES = (*RETRAIN, "retrain_needed", "approval_needed", "approve")
# Skipped in a run without require_approval (the approval_needed short circuit): they never reach a worker.
WITHOUT_APPROVAL = ("approve", "promote")
GPU_STAGES = {s.name for s in REGISTRY if s.gpu and s.name in RETRAIN}
# Set through the trigger form's own fields. Tiny, so the run takes minutes on CPU; four epochs so
# that the fault below lands between two epoch checkpoints. 40 px is the smallest size that gets the
# ImageNet stem (dermaops.models): several times less compute than the small stem at 28 px.
FORM = {
    "epochs": 4,
    "finetune_epochs": 0,
    "image_size": 40,
    "max_train_images": 300,
    "batch_size": 64,
    "baseline_trees": 20,
}
ARCH = "resnet18"


@pytest.fixture(scope="module")
def slack():
    server = SlackApiServer(host=docker_bridge_gateway()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, slack, docker_engine):
    workdir = tmp_path_factory.mktemp("stack")
    stack = Stack(
        workdir,
        settings={
            # Two workers: airflow-worker serves only the default queue, the gpu-worker profile's
            # airflow-worker-gpu only the gpu queue.
            "DERMAOPS_WORKER_QUEUES": "default",
            "DERMAOPS_STACK_PROFILES": "gpu-worker",
            "SLACK_BOT_TOKEN": TOKEN,
            "DERMAOPS_SLACK_CHANNEL": CHANNEL,
            "DERMAOPS_SLACK_API_URL": slack.url,
            # Only the run this test triggers: unpausing must not also start the latest weekly
            # interval (catchup=False does that, docs/deployment.md), which would queue ours
            # behind a full default recipe (max_active_runs=1).
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        },
    )
    started = time.monotonic()
    try:
        up = stack.run("up")
        stack.up_seconds = time.monotonic() - started
        print(f"\nstack up in {stack.up_seconds:.0f} s:\n{up.stdout}")
        yield stack
    finally:
        # test_down_v_leaves_nothing takes it down; this is for a failure before that.
        if stack.is_up:
            print(f"\ncompose logs: {stack.save_logs(workdir / 'compose.log')}")
            stack.run("down", "-v", timeout=600)


@pytest.fixture
def compose_logs(stack, tmp_path):
    """The services' logs of the end-to-end test, kept beside its screenshots, pass or fail."""
    yield
    if stack.is_up:
        print(f"\ncompose logs: {stack.save_logs(tmp_path / 'compose.log')}")


@pytest.fixture(scope="module")
def s3(stack):
    env = stack.secrets
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_url,
        aws_access_key_id=env["MINIO_ROOT_USER"],
        aws_secret_access_key=env["MINIO_ROOT_PASSWORD"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def upload_pack(s3, bucket: str, pack: Path) -> str:
    for path in sorted(pack.iterdir()):
        s3.upload_file(str(path), bucket, f"{SOURCE_PREFIX}/{path.name}")
    return f"s3://{bucket}/{SOURCE_PREFIX}"


def keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def docker_ps(*filters: str) -> list[str]:
    args = ["docker", "ps", "-a", "--format", "{{.ID}} {{.Image}} {{.Names}} {{.Status}}"]
    for f in filters:
        args += ["--filter", f]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.split("\n")[:-1]


# --- the browser part: what a user clicks ---


def login(browser, stack: Stack) -> None:
    env = stack.secrets
    browser.get(f"{stack.url}/")
    wait = WebDriverWait(browser, 60)
    user = wait.until(ec.presence_of_element_located((By.NAME, "username")))
    user.send_keys(env["_AIRFLOW_WWW_USER_USERNAME"])
    browser.find_element(By.NAME, "password").send_keys(env["_AIRFLOW_WWW_USER_PASSWORD"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda b: "/auth/" not in b.current_url and "login" not in b.current_url)


def set_field(browser, name: str, value) -> None:
    field = WebDriverWait(browser, 30).until(ec.element_to_be_clickable((By.NAME, f"element_{name}")))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def choose(browser, name: str, value: str) -> None:
    """Pick an option of an enum param's select (react-select: type, then Enter)."""
    select = browser.find_element(By.ID, f"element_{name}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", select)
    select.click()
    typed = select.find_element(By.CSS_SELECTOR, "input[type=text]")
    typed.send_keys(value)
    typed.send_keys(Keys.ENTER)
    hidden = browser.find_element(By.NAME, f"element_{name}")
    WebDriverWait(browser, 10).until(lambda b: hidden.get_attribute("value") == value)


def click_button(browser, *labels: str, timeout: float = 30):
    """Click the first visible button whose text or aria-label is one of labels."""

    def find(b):
        for el in b.find_elements(By.CSS_SELECTOR, "button, [role=button], [role=switch], label"):
            text = (el.text or "").strip()
            aria = el.get_attribute("aria-label") or ""
            if el.is_displayed() and (text in labels or aria in labels):
                return el
        return None

    el = WebDriverWait(browser, timeout).until(find)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()
    return el


def trigger_from_the_form(browser, stack: Stack, api, source: str, artifacts: Path) -> Path:
    browser.get(f"{stack.url}/dags/{DAG_ID}")
    wait = WebDriverWait(browser, 180)
    # The DAG page is there once its Trigger button is (the first load is slow on 2 cores).
    trigger = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label='Trigger Dag']")))
    # Unpause: the switch in the DAG's header.
    control = browser.find_element(By.CSS_SELECTOR, "label[data-scope=switch] [data-part=control]")
    ActionChains(browser).move_to_element(control).click().perform()
    wait_for(
        "the DAG to be unpaused",
        lambda: api.get(f"{stack.url}/api/v2/dags/{DAG_ID}", timeout=10).json()["is_paused"] is False,
        60,
        every=1,
    )
    trigger.click()
    # The form: this DAG's params as fields (element_<param>).
    wait.until(ec.presence_of_element_located((By.NAME, "element_source")))
    set_field(browser, "source", source)
    for name, value in FORM.items():
        set_field(browser, name, value)
    choose(browser, "arch", ARCH)
    form_shot = artifacts / "trigger-form.png"
    browser.save_screenshot(str(form_shot))
    dialog_buttons = browser.find_elements(By.CSS_SELECTOR, "[role=dialog] button")
    submit = [b for b in dialog_buttons if b.text.strip() == "Trigger" and b.is_displayed()]
    assert submit, f"no Trigger button in the form: {[b.text for b in dialog_buttons]}"
    submit[-1].click()
    return form_shot


# --- the REST side: what the run did ---


def task_instances(api, stack: Stack, run_id: str) -> dict[str, dict]:
    url = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
    return {ti["task_id"]: ti for ti in api.get(url, timeout=10).json()["task_instances"]}


def task_log(api, stack: Stack, run_id: str, task_id: str, try_number: int) -> str:
    url = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
    response = api.get(url, params={"full_content": "true"}, headers={"Accept": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    content = response.json()["content"]
    if isinstance(content, str):
        return content
    return "\n".join(json.dumps(entry) if not isinstance(entry, str) else entry for entry in content)


def xcom_values(api, stack: Stack, run_id: str) -> list:
    base = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
    entries = api.get(f"{base}/~/xcomEntries", params={"limit": 100}, timeout=10).json()["xcom_entries"]
    values = []
    for entry in entries:
        url = f"{base}/{entry['task_id']}/xcomEntries/{entry['key']}"
        values.append(api.get(url, params={"map_index": entry.get("map_index", -1)}, timeout=10).json()["value"])
    return values


def test_the_deployment_end_to_end(stack, compose_logs, s3, slack, tmp_path, pack_28px):
    t0 = time.monotonic()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    env = stack.secrets
    bucket = env.get("DERMAOPS_BUCKET", "dermaops")
    secrets = {
        "S3 secret key": env["MINIO_ROOT_PASSWORD"],
        "Slack token": TOKEN,
        "UI password": env["_AIRFLOW_WWW_USER_PASSWORD"],
        "Fernet key": env["AIRFLOW__CORE__FERNET_KEY"],
    }
    source = upload_pack(s3, bucket, pack_28px)
    api = stack.api()
    wait_for("the DAG to be parsed", lambda: api.get(f"{stack.url}/api/v2/dags/{DAG_ID}", timeout=10).ok, 300)

    browser = chromium(tmp_path / "chromium-profile")
    try:
        login(browser, stack)
        form_shot = trigger_from_the_form(browser, stack, api, source, artifacts)

        def our_run():
            runs = api.get(f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns", timeout=10).json()["dag_runs"]
            manual = [r for r in runs if r["run_type"] == "manual"]
            return manual[0] if manual else None

        run = wait_for("the triggered run", our_run, 60)
        run_id = run["dag_run_id"]
        triggered = time.monotonic()
        assert run["conf"]["source"] == source
        for name, value in {**FORM, "arch": ARCH}.items():
            assert run["conf"][name] == value, (name, run["conf"])
        dag = api.get(f"{stack.url}/api/v2/dags/{DAG_ID}", timeout=10).json()
        assert dag["is_paused"] is False

        # The fault: the gpu worker is stopped while train runs, after its first epoch checkpoint.
        checkpoint = f"runs/{run_key(run_id)}/models/cnn/checkpoints/last.pt"
        wait_for("train's first epoch checkpoint", lambda: keys(s3, bucket, checkpoint), 900, every=0.5)
        assert task_instances(api, stack, run_id)["train"]["state"] == "running"
        stopped = time.monotonic()
        stack.compose("stop", "airflow-worker-gpu", timeout=120)
        print(f"gpu worker stopped in {time.monotonic() - stopped:.0f} s while train ran")
        # Its stage container went with it: no orphan training on.
        torch_image = env["DERMAOPS_TORCH_IMAGE"]
        assert docker_ps(f"ancestor={torch_image}", "status=running") == []
        train = task_instances(api, stack, run_id)["train"]
        assert train["state"] in ("up_for_retry", "failed", "scheduled", "queued"), train
        stack.compose("start", "airflow-worker-gpu", timeout=120)

        def finished():
            r = api.get(f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json()
            return r if r["state"] in ("success", "failed") else None

        run = wait_for(f"run {run_id} to finish", finished, 1500, every=5)
        run_seconds = time.monotonic() - triggered
        tis = task_instances(api, stack, run_id)
        states = {t: ti["state"] for t, ti in tis.items()}
        # A failed teardown (notify) leaves the run a success: every task's state is checked, and the
        # log tail of each one that did not succeed goes into the message.
        failed = [t for t, state in states.items() if state not in ("success", "skipped")]
        if run["state"] != "success" or failed:
            tails = {t: task_log(api, stack, run_id, t, tis[t]["try_number"])[-4000:] for t in failed}
            raise AssertionError(
                f"run {run_id} ended {run['state']}: {states}\n"
                + "\n".join(f"--- {t} try {tis[t]['try_number']} ---\n{tail}" for t, tail in tails.items())
            )
        assert states == {t: "skipped" if t in WITHOUT_APPROVAL else "success" for t in STAGES}, states

        browser.get(f"{stack.url}/dags/{DAG_ID}/runs/{run_id}")
        time.sleep(3)
        grid_shot = artifacts / "grid-after-run.png"
        browser.save_screenshot(str(grid_shot))
    finally:
        browser.quit()

    # Where each task ran: train/evaluate on the gpu-queue worker, the rest on the other.
    gpu_hosts = stack.container_hostnames("airflow-worker-gpu")
    default_hosts = stack.container_hostnames("airflow-worker")
    print(f"\nrun {run_id}: {run['state']} in {run_seconds:.0f} s (trigger to finish)")
    for task_id in (t for t in STAGES if t not in WITHOUT_APPROVAL):
        ti = tis[task_id]
        print(
            f"  {task_id:15s} {ti['duration'] or 0:7.1f} s  try {ti['try_number']}  on {ti['hostname']} ({ti['queue']})"
        )
        expected = gpu_hosts if task_id in GPU_STAGES else default_hosts
        assert ti["hostname"] in expected, (task_id, ti["hostname"], expected)
        assert ti["queue"] == ("gpu" if task_id in GPU_STAGES else "default")

    # The retry resumed from the checkpoint of the stopped try.
    assert tis["train"]["try_number"] == 2
    first, second = (task_log(api, stack, run_id, "train", n) for n in (1, 2))
    assert "resuming from epoch" in second, second[-3000:]
    # One timestamp and the stage's own level per line (the runner re-logs each stage line).
    assert "INFO dermaops" not in second and "WARNING py.warnings" not in second

    # The run's artifacts in the stack's S3: the report, the promotion decision (and the champion
    # only when that decision promoted).
    run_prefix = f"runs/{run_key(run_id)}"
    report = s3.get_object(Bucket=bucket, Key=f"{run_prefix}/notify/report.md")["Body"].read().decode()
    assert run_id in report
    history = keys(s3, bucket, "registry/ham10000/history/")
    decisions = [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in history]
    ours = [d for d in decisions if d.get("run_id") == run_id]
    assert ours, f"no promotion decision of {run_id} in {history}"
    if ours[-1]["decision"] == "promoted":
        champion = json.loads(s3.get_object(Bucket=bucket, Key="registry/ham10000/champion.json")["Body"].read())
        assert champion["run_id"] == run_id

    # Slack got the run's Block Kit message.
    messages = [m for m in slack.messages if m.get("blocks")]
    assert messages and any(run_id in block_text(m["blocks"]) or run_id in (m.get("text") or "") for m in messages)

    # The schedule: next run on a Monday at 03:00 UTC.
    dag = api.get(f"{stack.url}/api/v2/dags/{DAG_ID}", timeout=10).json()
    next_run = dt.datetime.fromisoformat(dag["next_dagrun_run_after"].replace("Z", "+00:00")).astimezone(dt.UTC)
    assert (next_run.weekday(), next_run.hour, next_run.minute) == (0, 3, 0), next_run

    # No secret in the rendered fields of train and notify, in any task log, or in XCom.
    exposed = []
    for task_id in ("train", "notify"):
        url = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}"
        rendered = json.dumps(api.get(url, timeout=10).json()["rendered_fields"])
        exposed += [(f"rendered {task_id}", name) for name, value in secrets.items() if value in rendered]
    for task_id in (t for t in STAGES if t not in WITHOUT_APPROVAL):  # the skipped ones never ran: no log
        for n in range(1, tis[task_id]["try_number"] + 1):
            text = first if (task_id, n) == ("train", 1) else task_log(api, stack, run_id, task_id, n)
            exposed += [(f"log {task_id} try {n}", name) for name, value in secrets.items() if value in text]
    xcoms = json.dumps(xcom_values(api, stack, run_id))
    exposed += [("xcom", name) for name, value in secrets.items() if value in xcoms]
    assert not exposed, exposed

    # No stage container is left behind.
    assert docker_ps("label=dermaops.stage") == []

    print(f"screenshots:\n  {form_shot}\n  {grid_shot}")
    print(f"deployment test body: {time.monotonic() - t0:.0f} s (stack up before it: {stack.up_seconds:.0f} s)")


def test_down_v_leaves_nothing(stack):
    # Runs after the end-to-end test (same module-scoped stack): take it down and look.
    stack.run("down", "-v", timeout=600)
    project = f"label=com.docker.compose.project={stack.project}"
    assert docker_ps(project) == []
    volumes = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", project], capture_output=True, text=True, check=True
    ).stdout.split()
    assert volumes == []
    networks = subprocess.run(
        ["docker", "network", "ls", "-q", "--filter", f"name=^{stack.project}$"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert networks == []
    assert docker_ps("label=dermaops.stage") == []
