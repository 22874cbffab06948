"""The deployment, used as an operator uses it, on one stack (module scope):

1. `scripts/stack up` with two Celery workers (one serving the default queue, one the gpu queue) and the
   weekly schedule on; `scripts/stack seed` puts a small real pack into the stack's S3 and makes it the
   deployment's source (the Airflow Variable dermaops_source).
2. A real headless Chromium logs in, opens the (paused) DAG and triggers a reviewed run from the trigger
   form's own fields (tiny recipe, require_approval, the source left blank: the deployment's), with
   "Unpause on trigger" unticked; then it switches the DAG on. The weekly run of the latest interval
   starts then (catchup=False), once the reviewed run is through (max_active_runs=1; the reviewed run
   goes first because it was queued before the DAG was on, see reviewed_run_goes_first).
3. The reviewed run: the gpu worker is stopped while `train` runs and `train` resumes on its restart;
   the reviewer approves in the UI's Required Actions with a comment, which reaches the registry
   history, the model card and the run report; the registry view shows the champion's operating point.
4. The weekly run ingests the seeded source with the default recipe, and succeeds.
5. A run marked failed in the UI ("Mark Dag Run as -> Failed") while ingest runs stays failed, and its
   report says who marked it and when.
6. `scripts/stack down -v` leaves nothing behind.

Slow (minutes; cold image builds are scripts/build-images'), needs Docker. Artifacts (screenshots,
the stack's env file, the services' logs) go under the test's tmp folder; their paths are printed.
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
from botocore.exceptions import ClientError
from dermaops import access
from dermaops.config import SOURCE_VARIABLE
from dermaops.pipeline import RETRAIN, run_key
from dermaops.pipeline import STAGES as REGISTRY
from dermaops.promotion import Registry
from dermaops.store import ArtifactStore, S3Uri
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.airflow_env import DAG_ID
from tests.support.recipes import SMALL_FORM
from tests.support.slack_api import CHANNEL, TOKEN, SlackApiServer, block_text
from tests.support.stack import Stack, chromium, docker_bridge_gateway, wait_for

pytestmark = [pytest.mark.deployment, pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

# Every task of a run: the stages, the two short circuits and the outcome task (they run in the worker
# itself, on the default queue), and the approval (deferred to the triggerer while it waits).
TASKS = (*RETRAIN, "retrain_needed", "approval_needed", "approve", "outcome")
GPU_STAGES = {s.name for s in REGISTRY if s.gpu and s.name in RETRAIN}
# Set through the trigger form's own fields (tests/support/recipes.py: why these values).
FORM = SMALL_FORM
SWITCHES = ("require_approval",)
ARCH = "resnet18"
COMMENT = "Recall up on the rare classes; fine for the pilot"
# Inside a stage container, nothing listens there: ingest fails, transiently, until the run is marked failed.
DOWN_SOURCE = "http://127.0.0.1:9/ham10000"


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


def keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def text_of(s3, bucket: str, key: str) -> str:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


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
    """Pick an option of an enum param's select (react-select: type to filter, click the exact option).

    Enter would take the first match, and the blank option's label names the recipe's values
    ("the recipe's value (quick-cpu resnet18, ...)"), so it matches too.
    """
    select = browser.find_element(By.ID, f"element_{name}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", select)
    select.click()
    typed = select.find_element(By.CSS_SELECTOR, "input[type=text]")
    typed.send_keys(value)
    options = WebDriverWait(browser, 10).until(
        lambda b: [o for o in select.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.strip() == value]
    )
    options[0].click()
    hidden = browser.find_element(By.NAME, f"element_{name}")
    WebDriverWait(browser, 10).until(lambda b: hidden.get_attribute("value") == value)


def toggle(browser, root_css: str, want: str) -> None:
    """Click a Chakra switch or checkbox (its root element) until its data-state is `want`."""
    root = browser.find_element(By.CSS_SELECTOR, root_css)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", root)
    if root.get_attribute("data-state") != want:
        root.find_element(By.CSS_SELECTOR, "[data-part=control]").click()
    WebDriverWait(browser, 10).until(lambda b: root.get_attribute("data-state") == want)


def dialog_button(browser, label: str):
    buttons = [b for b in browser.find_elements(By.CSS_SELECTOR, "[role=dialog] button") if b.is_displayed()]
    found = [b for b in buttons if b.text.strip() == label]
    assert found, f"no {label!r} button in the dialog: {[b.text for b in buttons]}"
    return found[-1]


def trigger_from_the_form(browser, stack: Stack, artifacts: Path) -> Path:
    """The reviewed run, from the form of the paused DAG, with "Unpause on trigger" unticked."""
    browser.get(f"{stack.url}/dags/{DAG_ID}")
    wait = WebDriverWait(browser, 180)
    # The DAG page is there once its Trigger button is (the first load is slow on 2 cores).
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label='Trigger Dag']"))).click()
    # The form: this DAG's params as fields (element_<param>).
    wait.until(ec.presence_of_element_located((By.NAME, "element_source")))
    assert browser.find_element(By.NAME, "element_source").get_attribute("value") == ""  # the deployment's
    # Blank recipe params show what a blank means, not "null".
    arch = browser.find_element(By.ID, "element_arch").text
    assert "the recipe's value" in arch and "null" not in arch, arch
    for name, value in FORM.items():
        set_field(browser, name, value)
    choose(browser, "arch", ARCH)
    for name in SWITCHES:
        toggle(browser, f"label[data-scope=switch][id='switch:element_{name}']", "checked")
    unpause = browser.find_element(By.XPATH, "//label[@data-scope='checkbox'][contains(., 'on trigger')]")
    toggle(browser, f"label[id='{unpause.get_attribute('id')}']", "unchecked")
    form_shot = artifacts / "trigger-form.png"
    browser.save_screenshot(str(form_shot))
    dialog_button(browser, "Trigger").click()
    return form_shot


def unpause(browser, stack: Stack, api) -> None:
    browser.get(f"{stack.url}/dags/{DAG_ID}")
    wait = WebDriverWait(browser, 180)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label='Trigger Dag']")))
    # The switch in the DAG's header.
    control = browser.find_element(By.CSS_SELECTOR, "label[data-scope=switch] [data-part=control]")
    ActionChains(browser).move_to_element(control).click().perform()
    wait_for("the DAG to be unpaused", lambda: dag_info(api, stack)["is_paused"] is False, 60, every=1)


def approve_in_required_actions(browser, stack: Stack, run_id: str, artifacts: Path) -> Path:
    """What the Slack request links to: the approval task's Required Actions page; a comment, then Approve."""
    browser.get(f"{stack.url}/dags/{DAG_ID}/runs/{run_id}/tasks/approve/required_actions?map_index=-1")
    comment = WebDriverWait(browser, 120).until(ec.element_to_be_clickable((By.NAME, "element_comment")))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", comment)
    comment.click()
    comment.send_keys(COMMENT)
    shot = artifacts / "required-actions.png"
    browser.save_screenshot(str(shot))
    approve = [b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Approve"]
    assert approve, "no Approve button on the Required Actions page"
    approve[0].click()
    return shot


def mark_failed_in_the_ui(browser, stack: Stack, run_id: str) -> None:
    browser.get(f"{stack.url}/dags/{DAG_ID}/runs/{run_id}")
    WebDriverWait(browser, 120).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label='Mark Dag Run as...']"))
    ).click()
    failed = WebDriverWait(browser, 30).until(
        lambda b: [
            i for i in b.find_elements(By.CSS_SELECTOR, "[role=menuitem][data-value=failed]") if i.is_displayed()
        ]
    )
    failed[0].click()
    WebDriverWait(browser, 30).until(lambda b: dialog_button(b, "Confirm")).click()


# --- the REST side: what the runs did ---


def dag_info(api, stack: Stack) -> dict:
    return api.get(f"{stack.url}/api/v2/dags/{DAG_ID}", timeout=10).json()


def runs_of(api, stack: Stack) -> list[dict]:
    return api.get(f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns", timeout=10).json()["dag_runs"]


def run_of(api, stack: Stack, run_id: str) -> dict:
    return api.get(f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json()


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


def xcom(api, stack: Stack, run_id: str, task_id: str) -> dict:
    url = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
    return api.get(url, timeout=10).json()["value"]


def finished(api, stack: Stack, run_id: str) -> dict | None:
    run = run_of(api, stack, run_id)
    return run if run["state"] in ("success", "failed") else None


def assert_succeeded(api, stack: Stack, run: dict) -> dict[str, dict]:
    """Every task succeeded or was skipped; else the log tail of each one that did not, in the message."""
    run_id = run["dag_run_id"]
    tis = task_instances(api, stack, run_id)
    states = {t: ti["state"] for t, ti in tis.items()}
    failed = [t for t, state in states.items() if state not in ("success", "skipped")]
    if run["state"] != "success" or failed:
        tails = {t: task_log(api, stack, run_id, t, tis[t]["try_number"])[-4000:] for t in failed}
        raise AssertionError(
            f"run {run_id} ended {run['state']}: {states}\n"
            + "\n".join(f"--- {t} try {tis[t]['try_number']} ---\n{tail}" for t, tail in tails.items())
        )
    return tis


def reviewed_run_goes_first(api, stack: Stack, run: dict) -> None:
    """The DAG processor counts the queued manual run as active (its next parse after the trigger); only then
    is the DAG switched on, so the scheduler creates the weekly run after it (max_active_runs=1) instead of
    before it (an earlier run_after). The reviewed challenger is then judged against an empty registry."""
    created = dt.datetime.fromisoformat(run["queued_at"].replace("Z", "+00:00"))

    def parsed_since():
        parsed = dag_info(api, stack)["last_parsed_time"]
        return parsed and dt.datetime.fromisoformat(parsed.replace("Z", "+00:00")) > created + dt.timedelta(seconds=1)

    wait_for("the DAG processor to see the queued run", parsed_since, 240, every=2)


def test_the_deployment_end_to_end(stack, compose_logs, s3, slack, tmp_path, small_pack):
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    env = stack.secrets
    bucket = env.get("DERMAOPS_BUCKET", "dermaops")
    user = env["_AIRFLOW_WWW_USER_USERNAME"]
    secrets = {
        "S3 secret key": env["MINIO_ROOT_PASSWORD"],
        **{f"{role} S3 secret key": env[access.secret_env(role)] for role in access.ROLES},
        "Slack token": TOKEN,
        "UI password": env["_AIRFLOW_WWW_USER_PASSWORD"],
        "Fernet key": env["AIRFLOW__CORE__FERNET_KEY"],
    }
    api = stack.api()
    wait_for("the DAG to be parsed", lambda: api.get(f"{stack.url}/api/v2/dags/{DAG_ID}", timeout=10).ok, 300)

    # 1. The data, as an operator puts it there: scripts/stack seed, the deployment's source.
    started = time.monotonic()
    source = stack.run("seed", str(small_pack)).stdout.strip().splitlines()[-1]
    timings["seed"] = time.monotonic() - started
    assert source == f"s3://{bucket}/sources/{small_pack.name}"
    assert sorted(k.rsplit("/", 1)[1] for k in keys(s3, bucket, f"sources/{small_pack.name}/")) == sorted(
        p.name for p in small_pack.iterdir()
    )
    variable = api.get(f"{stack.url}/api/v2/variables/{SOURCE_VARIABLE}", timeout=10).json()
    assert variable["value"] == source

    browser = chromium(tmp_path / "chromium-profile")
    try:
        # 2. The reviewed run from the form of the paused DAG; then the DAG switched on.
        login(browser, stack)
        assert dag_info(api, stack)["is_paused"] is True
        form_shot = trigger_from_the_form(browser, stack, artifacts)

        def manual_run():
            manual = [r for r in runs_of(api, stack) if r["run_type"] == "manual"]
            return manual[0] if manual else None

        run = wait_for("the triggered run", manual_run, 60)
        run_id = run["dag_run_id"]
        assert dag_info(api, stack)["is_paused"] is True  # "Unpause on trigger" was unticked
        assert run["conf"].get("source") is None  # blank: the deployment's
        for name, value in {**FORM, "arch": ARCH, **dict.fromkeys(SWITCHES, True)}.items():
            assert run["conf"][name] == value, (name, run["conf"])
        started = time.monotonic()
        reviewed_run_goes_first(api, stack, run)
        unpause(browser, stack, api)
        timings["unpause"] = time.monotonic() - started
        triggered = time.monotonic()

        # 3. The fault: the gpu worker is stopped while train runs, after its first epoch checkpoint.
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

        # The gate passed: the run waits for a reviewer, who answers in Required Actions with a comment.
        def awaiting_approval():
            now = run_of(api, stack, run_id)
            assert now["state"] in ("queued", "running"), f"the run ended ({now['state']}) before asking for approval"
            return task_instances(api, stack, run_id)["approve"]["state"] == "awaiting_input"

        wait_for("the approval task to await input", awaiting_approval, 1500, every=5)
        assert xcom(api, stack, run_id, "evaluate")["decision"] == "awaiting_approval"
        time.sleep(10)  # as a person would: not within the scheduler's loop that parked the task
        approval_shot = approve_in_required_actions(browser, stack, run_id, artifacts)
        run = wait_for(f"run {run_id} to finish", lambda: finished(api, stack, run_id), 900, every=5)
        run_seconds = time.monotonic() - triggered
        tis = assert_succeeded(api, stack, run)
        assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(TASKS, "success")
        browser.get(f"{stack.url}/dags/{DAG_ID}/runs/{run_id}")
        time.sleep(3)
        grid_shot = artifacts / "grid-after-run.png"
        browser.save_screenshot(str(grid_shot))

        # The reviewer and the comment reach the registry history, the model card and the run report.
        store = ArtifactStore(s3)
        registry = Registry(store, S3Uri(bucket, "registry/ham10000"))
        ours = [h for h in registry.history() if h.get("run_id") == run_id]
        assert [h["decision"] for h in ours] == ["awaiting_approval", "promoted"], ours
        assert (ours[-1]["approval"]["reviewer"], ours[-1]["approval"]["comment"]) == (user, COMMENT)
        champion = json.loads(text_of(s3, bucket, "registry/ham10000/champion.json"))
        assert champion["run_id"] == run_id and champion["approval"]["comment"] == COMMENT
        card = text_of(s3, bucket, S3Uri.parse(champion["model_uri"].rsplit("/", 1)[0]).join("model_card.md").key)
        assert f"approved by {user} (" in card and f"): {COMMENT}" in card
        report = text_of(s3, bucket, f"runs/{run_key(run_id)}/notify/report.md")
        assert f"approved by {user}: {COMMENT}" in report
        assert not keys(s3, bucket, f"registry/ham10000/pending/{run_key(run_id)}.json")  # decided: archived
        assert keys(s3, bucket, f"registry/ham10000/approvals/{run_key(run_id)}.json")

        # Least privilege in the stack: train ran with its role's key, which may not write the registry.
        train_log = task_log(api, stack, run_id, "train", tis["train"]["try_number"])
        assert "S3 credentials from connection dermaops_s3_train (key dermaops-train)" in train_log
        train_key = boto3.client(
            "s3",
            endpoint_url=stack.s3_url,
            aws_access_key_id=access.key_id("train"),
            aws_secret_access_key=env[access.secret_env("train")],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        with pytest.raises(ClientError) as refused:
            train_key.put_object(Bucket=bucket, Key="registry/ham10000/champion.json", Body=b"{}")
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
        assert json.loads(text_of(s3, bucket, "registry/ham10000/champion.json")) == champion

        # The registry view (in the UI's Browse menu) shows the champion's melanoma operating point.
        assert champion["mel_threshold"] == champion["operating_point"]["threshold"] is not None
        browser.get(f"{stack.url}/dermaops-registry/")
        page = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "champion")).text
        assert f"Melanoma operating point p(mel) >= {champion['mel_threshold']:.3f}" in page, page
        assert "validation sensitivity" in page and "argmax" not in page
        browser.get(f"{stack.url}/plugin/dermaops-registry")
        time.sleep(8)  # the view in the UI's iframe
        registry_shot = artifacts / "registry-view.png"
        browser.save_screenshot(str(registry_shot))

        # 4. The weekly run of the latest interval, started by the switch: the seeded source, the default
        # recipe, after the reviewed run.
        weekly_started = time.monotonic()

        def scheduled_run():
            scheduled = [r for r in runs_of(api, stack) if r["run_type"] == "scheduled"]
            return scheduled[0] if scheduled else None

        weekly = wait_for("the weekly run", scheduled_run, 300)
        weekly = wait_for("the weekly run to finish", lambda: finished(api, stack, weekly["dag_run_id"]), 1800, every=5)
        timings["weekly run"] = time.monotonic() - weekly_started
        weekly_tis = assert_succeeded(api, stack, weekly)
        assert weekly["conf"].get("source") is None and weekly["start_date"] > run["end_date"]
        url = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{weekly['dag_run_id']}/taskInstances/ingest"
        ingested = api.get(url, timeout=10).json()["rendered_fields"]
        assert source in json.dumps(ingested), ingested
        assert (
            xcom(api, stack, weekly["dag_run_id"], "ingest")["dataset_uri"]
            == xcom(api, stack, run_id, "ingest")["dataset_uri"]
        )  # the same data: stored once

        # 5. A run an operator marks failed, in the UI, while ingest works on a source that is down.
        marked_started = time.monotonic()
        trigger = api.post(
            f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"source": DOWN_SOURCE}}
        )
        assert trigger.status_code == 200, trigger.text
        marked_id = trigger.json()["dag_run_id"]
        wait_for(
            "ingest to start",
            lambda: task_instances(api, stack, marked_id).get("ingest", {}).get("state") in ("running", "up_for_retry"),
            600,
        )
        mark_failed_in_the_ui(browser, stack, marked_id)
        marked = wait_for(f"run {marked_id} to finish", lambda: finished(api, stack, marked_id), 600, every=3)
        timings["marked-failed run"] = time.monotonic() - marked_started
        marked_tis = task_instances(api, stack, marked_id)
        marked_states = {t: ti["state"] for t, ti in marked_tis.items()}
        assert marked["state"] == "failed", marked_states
        assert (marked_states["notify"], marked_states["outcome"]) == ("success", "failed"), marked_states
        events = api.get(
            f"{stack.url}/api/v2/eventLogs", params={"dag_id": DAG_ID, "run_id": marked_id}, timeout=10
        ).json()["event_logs"]
        [event] = [e for e in events if e["event"] == "patch_dag_run"]
        assert event["owner"] == user
        said = f"marked failed by {user} at {event['when'][:19]}Z (Airflow audit log: patch_dag_run)"
        # The note names the run's try too (0: not cleared), so a re-run after a clear is not read as marked.
        assert f"{said[0].upper()}{said[1:-1]}; run try 0)" in marked["note"]
        marked_report = text_of(s3, bucket, f"runs/{run_key(marked_id)}/notify/report.md")
        assert f"- Outcome: **failed**: {said}" in marked_report
        browser.get(f"{stack.url}/dags/{DAG_ID}/runs/{marked_id}")
        time.sleep(4)
        marked_shot = artifacts / "marked-failed.png"
        browser.save_screenshot(str(marked_shot))
    finally:
        browser.quit()

    # Where each task ran: train/evaluate on the gpu-queue worker, the rest on the other.
    gpu_hosts = stack.container_hostnames("airflow-worker-gpu")
    default_hosts = stack.container_hostnames("airflow-worker")
    print(f"\nrun {run_id}: {run['state']} in {run_seconds:.0f} s (unpause to finish, the approval included)")
    for task_id in TASKS:
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

    # Slack got each run's Block Kit message: the reviewed one, the weekly one and the marked one.
    messages = [m for m in slack.messages if m.get("blocks")]
    for rid in (run_id, weekly["dag_run_id"], marked_id):
        assert any(rid in block_text(m["blocks"]) or rid in (m.get("text") or "") for m in messages), rid

    # The schedule: next run on a Monday at 03:00 UTC.
    dag = dag_info(api, stack)
    next_run = dt.datetime.fromisoformat(dag["next_dagrun_run_after"].replace("Z", "+00:00")).astimezone(dt.UTC)
    assert (next_run.weekday(), next_run.hour, next_run.minute) == (0, 3, 0), next_run

    # No secret in the rendered fields of train and notify, in any task log, or in XCom.
    exposed = []
    for task_id in ("train", "notify"):
        url = f"{stack.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}"
        rendered = json.dumps(api.get(url, timeout=10).json()["rendered_fields"])
        exposed += [(f"rendered {task_id}", name) for name, value in secrets.items() if value in rendered]
    for rid, instances in ((run_id, tis), (weekly["dag_run_id"], weekly_tis), (marked_id, marked_tis)):
        for task_id, ti in instances.items():
            for n in range(1, (ti["try_number"] or 0) + 1):
                text = first if (rid, task_id, n) == (run_id, "train", 1) else task_log(api, stack, rid, task_id, n)
                exposed += [(f"log {rid} {task_id} try {n}", name) for name, value in secrets.items() if value in text]
        values = json.dumps(xcom_values(api, stack, rid))
        exposed += [(f"xcom {rid}", name) for name, value in secrets.items() if value in values]
    assert not exposed, exposed

    # No stage container is left behind.
    assert docker_ps("label=dermaops.stage") == []

    print(
        "screenshots:\n  "
        + "\n  ".join(str(p) for p in (form_shot, approval_shot, grid_shot, registry_shot, marked_shot))
    )
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
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
