"""Airflow as users run it: API server, scheduler and dag processor (LocalExecutor, SQLite) on loopback.
The DAG is triggered through the REST API with non-default params, as the UI's trigger form does, and
the run must succeed with those params reaching the stages. With require_approval on, the run waits for a
reviewer, who rejects the challenger through the REST API (the human-in-the-loop task's hitlDetails)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from dermaops.promotion import Registry

from tests.support.airflow_env import AIRFLOW, DAG_ID, api_server_env
from tests.support.recipes import SMALL_FORM
from tests.support.slack_api import TOKEN, block_text

USER, PASSWORD = "dermaops", "trigger-form-" + secrets.token_hex(4)
# Non-default values for the knobs a user sets in the trigger form: the small recipe that still passes the
# gate (tests/support/recipes.py), so that the run asks for approval.
FORM = {**SMALL_FORM, "arch": "resnet18", "seed": 7, "promotion_margin": 0.0, "require_approval": True}
COMMENT = "macro F1 0.34 is not enough for the clinic pilot"


class Services:
    """Airflow's long-running processes, each in its own process group so that stopping one stops
    everything it started (task supervisors, stage subprocesses)."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = (
            subprocess.Popen(
                [AIRFLOW, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            ),
            log,
        )

    def check_alive(self) -> None:
        for name, (proc, _) in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc, log in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


@pytest.fixture
def approval_timeout_hours() -> float | None:
    """$DERMAOPS_APPROVAL_TIMEOUT_HOURS for the Airflow services (None: the DAG's default); a test sets it
    with @pytest.mark.parametrize."""
    return None


@pytest.fixture
def airflow_services(tmp_path, s3_server, bucket, slack_api, approval_timeout_hours):
    home = tmp_path / "airflow"
    home.mkdir()
    env, port = api_server_env(home, USER, PASSWORD, "admin")
    env.update(
        {
            **s3_server.env,
            "DERMAOPS_RUNNER": "local",
            "DERMAOPS_BUCKET": bucket.bucket,
            **slack_api.env(),  # the loopback Slack Web API: the approval request and the run report
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            # Only the triggered run: no scheduled run may start (and queue ours behind max_active_runs=1).
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
    )
    env.pop("DERMAOPS_APPROVAL_TIMEOUT_HOURS", None)
    if approval_timeout_hours is not None:
        env["DERMAOPS_APPROVAL_TIMEOUT_HOURS"] = str(approval_timeout_hours)
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    services = Services(env, home)
    services.start("api-server", "api-server")
    services.start("scheduler", "scheduler")
    services.start("dag-processor", "dag-processor")
    try:
        yield f"http://127.0.0.1:{port}", services
    finally:
        services.stop()


def wait_for(what: str, check, services: Services, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            result = check()
        except requests.RequestException as exc:  # the API server busy on a loaded machine: poll again
            result, last = None, exc
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


def get_token(base: str) -> str | None:
    try:
        response = requests.post(f"{base}/auth/token", json={"username": USER, "password": PASSWORD}, timeout=5)
    except requests.ConnectionError:
        return None  # not listening yet
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


def api_session(base: str, services: Services) -> requests.Session:
    """A REST session with the test user's token, once the API server answers."""
    token = wait_for("the API server", lambda: get_token(base), services, timeout=180)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    return api


def trigger(api: requests.Session, base: str, conf: dict) -> str:
    """Trigger a run of the DAG with `conf` as its params; its run_id."""
    response = api.post(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert response.status_code == 200, response.text
    return response.json()["dag_run_id"]


def finished_run(api: requests.Session, base: str, run_id: str) -> dict | None:
    """The run, once it succeeded or failed (a wait_for check)."""
    run = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json()
    return run if run["state"] in ("success", "failed") else None


def task_xcom(api: requests.Session, base: str, run_id: str, task_id: str) -> dict:
    url = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
    return api.get(url, timeout=10).json()["value"]


@pytest.mark.slow
def test_trigger_through_the_rest_api_with_form_params_and_reject_the_challenger(
    airflow_services, small_pack, store, bucket, slack_api, s3_server
):
    base, services = airflow_services
    form = {**FORM, "source": str(small_pack)}
    started = time.monotonic()
    api = api_session(base, services)
    assert requests.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10).status_code == 401  # no token, no API

    def dag_parsed():
        response = api.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10)
        return response.status_code == 200 and response.json()

    dag = wait_for("the dag processor to parse the DAG", dag_parsed, services, timeout=240)
    assert dag["is_paused"] is False and dag["max_active_runs"] == 1

    # Values outside their Params' bounds are refused at trigger time, as in the form. Airflow 3.3 reports the
    # first one only, followed by jsonschema's dump; its first line names the param and the bound it broke
    # (the form shows it at the top of the dialog; each bounded field's description states its bounds).
    conf = {"epochs": 600, "batch_size": 0}
    refused = api.post(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert refused.status_code == 400
    first = refused.json()["detail"].splitlines()[0]
    assert first == "Invalid input for param epochs: 600 is greater than the maximum of 500", first

    run_id = trigger(api, base, form)

    def awaiting_approval():
        run = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json()
        assert run["state"] in ("queued", "running"), f"the run ended ({run['state']}) before asking for approval"
        ti = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve", timeout=10).json()
        return ti if ti.get("state") == "awaiting_input" else None

    approve_ti = wait_for("the approval task to await input", awaiting_approval, services, timeout=900, every=5)
    waited = time.monotonic() - started

    def xcom(task_id: str) -> dict:
        return task_xcom(api, base, run_id, task_id)

    evaluation = xcom("evaluate")
    assert evaluation["decision"] == "awaiting_approval" and evaluation["promoted"] is False, evaluation
    assert "beats this run's Random Forest baseline" in evaluation["promotion_reason"]
    pending = store.get_json(evaluation["pending_uri"])
    assert pending["challenger"]["run_id"] == run_id and pending["resolved"] is None
    champion_uri = bucket.join("registry", "ham10000", "champion.json")
    assert not store.exists(champion_uri)  # the gate passed, but nothing is promoted before the answer

    hitl = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails"
    detail = api.get(hitl, timeout=10).json()
    assert detail["options"] == ["Approve", "Reject"] and detail["response_received"] is False
    assert run_id in detail["subject"] and f"Macro F1 {evaluation['macro_f1']:.4f}" in detail["body"]
    # The approval request reached Slack with the link to the task's Required Actions page.
    link = f"{base}/dags/{DAG_ID}/runs/{run_id}/tasks/approve/required_actions?map_index=-1"
    [request] = [m for m in slack_api.messages if "awaits approval" in m["text"]]
    assert link in request["text"] and link in block_text(request["blocks"])

    # Answer as a person would, not within the scheduler's loop: Airflow 3.3 with the LocalExecutor fails the
    # task if the answer resumes it before the scheduler has processed the exit of the process that parked it
    # (the executor's "success" of that process then meets a queued task instance: "state changed externally";
    # seen here with an answer 6 s after the request on a loaded machine).
    parked = f"executor event with state success for task instance TaskInstanceKey(dag_id='{DAG_ID}', task_id='approve'"
    wait_for(
        "the scheduler to see the approval task park",
        lambda: parked in (services.logs / "scheduler.log").read_text(errors="replace"),
        services,
        timeout=120,
    )

    # The reviewer (the test user) rejects it through the REST API, with a comment.
    answer = {"chosen_options": ["Reject"], "params_input": {"comment": COMMENT}}
    bad = api.patch(hitl, json={"chosen_options": ["Maybe"]}, timeout=10)
    assert bad.status_code == 400 and "Maybe" in bad.text  # refused before it reaches the task
    answered = api.patch(hitl, json=answer, timeout=10)
    assert answered.status_code == 200, answered.text
    assert answered.json()["responded_by"]["name"] == USER

    run = wait_for(f"run {run_id} to finish", lambda: finished_run(api, base, run_id), services, timeout=600, every=5)
    tis = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", timeout=10).json()
    states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    print(
        f"REST-triggered run: {run['state']} in {time.monotonic() - started:.0f} s (services included), "
        f"awaiting approval after {waited:.0f} s; {states}"
    )
    assert run["state"] == "success", states
    assert set(states.values()) == {"success"} and len(states) == 13
    assert run["conf"] == form

    train = xcom("train")
    assert (train["arch"], train["image_size"], train["n_train"]) == (
        FORM["arch"],
        FORM["image_size"],
        xcom("split")["counts"]["train"],
    )
    assert xcom("split")["seed"] == 7
    rendered = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/train", timeout=10).json()
    argv = rendered["rendered_fields"]["argv"]
    assert "--epochs=6" in argv and "--seed=7" in argv

    # The rejection is applied by the promote stage: the champion is not written, the registry history
    # records the reviewer and the comment, and the run's report says who rejected it.
    assert xcom("promote")["decision"] == "rejected"
    assert not store.exists(champion_uri)
    history = Registry(store, bucket.join("registry", "ham10000")).history()
    assert [(h["run_id"], h["decision"]) for h in history] == [(run_id, "awaiting_approval"), (run_id, "rejected")]
    assert history[-1]["approval"]["reviewer"] == USER and history[-1]["approval"]["comment"] == COMMENT
    assert history[-1]["reason"] == f"rejected by {USER}: {COMMENT}"
    notify = xcom("notify")
    assert notify["outcome"] == "success"
    assert notify["promotion"] == {"promoted": False, "reason": f"rejected by {USER}: {COMMENT}"}
    report = [m for m in slack_api.messages if "succeeded" in m["text"]][-1]
    assert f"*not promoted*: rejected by {USER}: {COMMENT}" in block_text(report["blocks"])

    # No secret in the approval task's rendered fields, XCom or log (Slack token, S3 secret key).
    approve = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve", timeout=10).json()
    logs = api.get(
        f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/logs/{approve['try_number']}",
        params={"full_content": "true"},
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    )
    assert logs.status_code == 200 and "approval request posted to Slack" in logs.text, logs.text[-2000:]
    seen = json.dumps(approve["rendered_fields"]) + json.dumps(xcom("approve")) + logs.text
    assert xcom("approve")["chosen_options"] == ["Reject"] and approve_ti["rendered_fields"]["subject"]
    for secret in (TOKEN, s3_server.env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in seen


@pytest.mark.parametrize("approval_timeout_hours", [0.01])
def test_an_approval_nobody_answers_ends_as_a_rejection_when_its_timeout_passes(
    airflow_services, small_pack, store, bucket, slack_api
):
    """Nobody answers the approval: when its response timeout passes (36 s here, 6 days by default),
    Airflow's scheduler answers with the default, Reject, for nobody; promote records that, the run
    succeeds (so the DAG's one active run is free again) and the report says why."""
    base, services = airflow_services
    api = api_session(base, services)

    def dag_parsed():
        return api.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10).status_code == 200

    wait_for("the dag processor to parse the DAG", dag_parsed, services, timeout=240)
    run_id = trigger(api, base, {**FORM, "source": str(small_pack)})
    run = wait_for(
        "the run to end without an answer", lambda: finished_run(api, base, run_id), services, timeout=900, every=5
    )
    tis = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", timeout=10).json()
    states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    assert run["state"] == "success" and states["approve"] == states["promote"] == "success", states

    def xcom(task_id: str) -> dict:
        return task_xcom(api, base, run_id, task_id)

    answer = xcom("approve")
    assert answer["chosen_options"] == ["Reject"] and answer["responded_by_user"] is None
    reason = "rejected: nobody answered within the approval's response timeout (its default is Reject)"
    assert (xcom("promote")["decision"], xcom("promote")["reason"], xcom("promote")["reviewer"]) == (
        "rejected",
        reason,
        None,
    )
    assert not store.exists(bucket.join("registry", "ham10000", "champion.json"))
    last = Registry(store, bucket.join("registry", "ham10000")).history()[-1]
    assert (last["run_id"], last["decision"], last["approval"]["timed_out"]) == (run_id, "rejected", True)
    report = [m for m in slack_api.messages if "succeeded" in m["text"]][-1]
    assert f"*not promoted*: {reason}" in block_text(report["blocks"])


@pytest.mark.slow
def test_a_run_marked_failed_while_ingest_waits_for_its_retry_stays_failed_and_says_who(
    airflow_services, store, bucket, slack_api
):
    """Issue 22: "Mark Dag Run as -> Failed" (the UI's PATCH of the run's state) while ingest waits for its
    retry. Airflow skips every unfinished task but leaves the teardowns to run and the run's state to the
    scheduler, which used to end it green. Now the run ends failed, and notify's report says who marked
    it and when, as Airflow's audit log has it."""
    from dermaops.embedded_s3 import free_port

    base, services = airflow_services
    api = api_session(base, services)

    def dag_parsed():
        return api.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10).status_code == 200

    wait_for("the dag processor to parse the DAG", dag_parsed, services, timeout=240)
    # Nothing listens there: a transient failure, which ingest retries (30 s later, the DAG's retry_delay).
    run_id = trigger(api, base, {"source": f"http://127.0.0.1:{free_port()}/ham10000"})
    run_url = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"

    def ingest_waits():
        ti = api.get(f"{run_url}/taskInstances/ingest", timeout=10).json()
        return ti.get("state") == "up_for_retry"

    wait_for("ingest to wait for its retry", ingest_waits, services, timeout=600, every=2)
    marked = api.patch(run_url, json={"state": "failed"}, timeout=30)
    assert marked.status_code == 200, marked.text

    run = wait_for(f"run {run_id} to finish", lambda: finished_run(api, base, run_id), services, timeout=600, every=3)
    tis = api.get(f"{run_url}/taskInstances", timeout=10).json()["task_instances"]
    states = {ti["task_id"]: ti["state"] for ti in tis}
    assert run["state"] == "failed", states
    assert states["notify"] == "success" and states["outcome"] == "failed", states
    assert {states[t] for t in states if t not in ("notify", "outcome")} == {"skipped"}, states

    # Who and when, where Airflow records them: the audit log's entry of the PATCH ...
    events = api.get(f"{base}/api/v2/eventLogs", params={"dag_id": DAG_ID, "run_id": run_id}, timeout=10).json()
    [event] = [e for e in events["event_logs"] if e["event"] == "patch_dag_run"]
    assert event["owner"] == USER
    when = event["when"][:19] + "Z"  # 2026-12-06T02:18:52.021697Z -> to the second
    said = f"marked failed by {USER} at {when} (Airflow audit log: patch_dag_run)"
    # ... noted on the run (shown in the UI), and in the report and the Slack message.
    assert f"Marked failed by {USER} at {when} (Airflow audit log: patch_dag_run; run try 0)" in run["note"]
    notify = task_xcom(api, base, run_id, "notify")
    assert notify["outcome"] == "failed"
    report = store.get_bytes(notify["report_uri"]).decode()
    assert f"- Outcome: **failed**: {said}" in report
    [message] = [m for m in slack_api.messages if run_id in m["text"] and "failed" in m["text"]][:1]
    assert said in message["text"] and f":raised_hand: The run was {said}" in block_text(message["blocks"])
    log = api.get(
        f"{run_url}/taskInstances/outcome/logs/1",
        params={"full_content": "true"},
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    )
    assert f"the run was {said}" in log.text
