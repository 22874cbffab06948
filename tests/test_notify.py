"""The notify stage against the loopback S3 and the loopback Slack Web API (tests/support/slack_api.py)."""

from __future__ import annotations

import json

from tests.support.slack_api import CHANNEL, TOKEN, block_text

RUN_ID = "manual__2026-11-27T04-00-00-00-00"
DATASET_URI = "s3://b/datasets/ham10000/3f9a0c1d2e4b"
SUCCESS_STATES = {t: "success" for t in ("ingest", "validate", "split", "train_baseline", "train", "evaluate")}
# Stage summaries as the stages print them (docs/architecture.md, "The stage contract").
SUCCESS_RESULTS = {
    "ingest": {
        "summary": {
            "stage": "ingest",
            "dataset_uri": DATASET_URI,
            "dataset_version": "3f9a0c1d2e4b",
            "n_images": 10015,
        },
        "error": None,
    },
    "evaluate": {
        "summary": {
            "stage": "evaluate",
            "accuracy": 0.7812,
            "balanced_accuracy": 0.5521,
            "macro_f1": 0.6034,
            "weighted_f1": 0.7745,
            "macro_auc": 0.9312,
            "mel_recall": 0.5811,
            "intervals": {"macro_f1": [0.5712, 0.6321], "mel_recall": [0.4903, 0.6652]},
            "mel_operating_point": {
                "threshold": 0.1834,
                "target_sensitivity": 0.85,
                "sensitivity": 0.8288,
                "sensitivity_ci": [0.7526, 0.8969],
                "specificity": 0.7102,
                "specificity_ci": [0.6781, 0.7411],
            },
            "promoted": True,
            "promotion_reason": "first model: mel recall 0.5811 clears the floor 0.5",
            "champion_uri": "s3://b/registry/ham10000/champion.json",
            "report_uri": f"s3://b/runs/{RUN_ID}/evaluation/report.md",
        },
        "error": None,
    },
}


def notify_args(bucket, states=SUCCESS_STATES, results=SUCCESS_RESULTS) -> list[str]:
    return [
        "notify",
        "--run-id",
        RUN_ID,
        "--states",
        json.dumps(states),
        "--results",
        json.dumps(results),
        "--started-at",
        "2026-11-27T04:00:00+00:00",
        "--report-out",
        str(bucket.join("runs", RUN_ID, "notify")),
    ]


def test_success_posts_outcome_metrics_and_promotion(run_stage, slack_api, store, bucket):
    result = run_stage(*notify_args(bucket), env=slack_api.env())

    summary = result.summary
    assert summary["outcome"] == "success" and summary["slack"] == "posted"
    assert summary["slack_channel"] == CHANNEL
    [message] = slack_api.messages
    assert message["channel"] == CHANNEL
    assert message["blocks"][0]["type"] == "header" and "succeeded" in message["blocks"][0]["text"]["text"]
    text = block_text(message["blocks"])
    for expected in ("3f9a0c1d2e4b", "10,015 images", "0.7812", "0.6034", "0.7745", "0.5811", "*promoted*"):
        assert expected in text, expected
    assert "first model: mel recall 0.5811 clears the floor 0.5" in text
    # Intervals beside the figures, and the melanoma operating point with its test sensitivity/specificity.
    assert "0.6034 [0.5712, 0.6321]" in text and "0.5811 [0.4903, 0.6652]" in text
    point = "p(mel) >= 0.183 (chosen on validation for sensitivity 0.85): test sensitivity 0.83 [0.75, 0.90], "
    assert point + "specificity 0.71 [0.68, 0.74]" in text
    assert all(f":white_check_mark: `{task}` success" in text for task in SUCCESS_STATES)
    assert summary["report_uri"] in text
    assert TOKEN not in result.stdout + result.stderr

    report = store.get_bytes(summary["report_uri"]).decode()
    assert "Outcome: **success**" in report
    assert "| Macro F1 | 0.6034 | [0.5712, 0.6321] |" in report and "| Melanoma recall | 0.5811 |" in report
    assert "| Accuracy | 0.7812 | n/a |" in report and point in report
    assert "**promoted to champion**" in report
    assert "evaluate.report_uri" in report and "ingest.dataset_uri" in report


def test_failed_run_names_the_failed_task_and_its_error(run_stage, slack_api, store, bucket):
    error = "dermaops validate: error: metadata: dx has values outside the 7 classes: 'xyz' (1 row)"
    states = {
        "ingest": "success",
        "validate": "failed",
        "split": "upstream_failed",
        "train_baseline": "upstream_failed",
    }
    states |= {"train": "upstream_failed", "evaluate": "upstream_failed"}
    results = {"ingest": SUCCESS_RESULTS["ingest"], "validate": {"summary": None, "error": error}}

    summary = run_stage(*notify_args(bucket, states, results), env=slack_api.env()).summary

    assert summary["outcome"] == "failed"
    [message] = slack_api.messages
    assert "failed" in message["blocks"][0]["text"]["text"]
    text = block_text(message["blocks"])
    assert f":x: `validate` failed: {error}" in text
    assert ":no_entry_sign: `train` upstream_failed" in text
    assert "no decision (evaluation did not run)" in text
    report = store.get_bytes(summary["report_uri"]).decode()
    assert f"| validate | failed | {error} |" in report and "No evaluation in this run." in report


def test_rate_limit_is_retried_after_the_servers_delay(run_stage, slack_api, bucket):
    slack_api.mode = "ratelimited"
    summary = run_stage(*notify_args(bucket), env=slack_api.env()).summary

    assert summary["slack"] == "posted"
    first, second = slack_api.requests
    assert second.at - first.at >= 1.0  # Retry-After: 1
    assert len(slack_api.messages) == 1


def test_invalid_token_fails_with_one_line_and_never_shows_the_token(run_stage, slack_api, store, bucket):
    bad_token = "xoxb-not-the-right-one"
    result = run_stage(*notify_args(bucket), env=slack_api.env(token=bad_token), check=False)

    assert result.returncode == 2
    assert "invalid_auth" in result.error_line and "SLACK_BOT_TOKEN" in result.error_line
    assert result.error_line.startswith("dermaops notify: error: Slack chat.postMessage")
    assert bad_token not in result.stdout + result.stderr
    assert slack_api.messages == []
    # The report is written before Slack is tried, so the run is still documented.
    assert store.exists(bucket.join("runs", RUN_ID, "notify", "report.md"))
    assert not store.exists(bucket.join("runs", RUN_ID, "notify", "manifest.json"))


def test_unknown_channel_fails_with_one_line(run_stage, slack_api, bucket):
    slack_api.mode = "channel_not_found"
    result = run_stage(*notify_args(bucket), env=slack_api.env(channel="#nowhere"), check=False)

    assert result.returncode == 2
    assert "channel_not_found" in result.error_line and "#nowhere" in result.error_line


def test_without_slack_the_report_is_still_written_and_says_so(run_stage, store, bucket):
    result = run_stage(*notify_args(bucket), env={"SLACK_BOT_TOKEN": "", "DERMAOPS_SLACK_CHANNEL": ""})

    assert result.summary["slack"] == "skipped"
    assert "Slack skipped" in result.stderr
    report = store.get_bytes(result.summary["report_uri"]).decode()
    assert "Outcome: **success**" in report
    # Whoever reads the report learns that nobody was told, not only whoever reads the task log.
    assert "- Slack: not configured (no SLACK_BOT_TOKEN): this report was not posted" in report


def test_a_run_an_operator_marked_failed_says_who_and_when(run_stage, slack_api, store, bucket):
    """What the DAG renders from the run's note when an operator marked it failed (dermaops_runner.marks):
    ingest was running (Airflow failed it), the rest never ran (skipped), nothing failed on its own."""
    states = {"ingest": "failed", **{t: "skipped" for t in ("validate", "split", "train_baseline", "train")}}
    mark = {"by": "dr.lee", "at": "2026-11-27T04:05:09Z", "event": "patch_dag_run"}
    args = [*notify_args(bucket, states, {}), "--marked-failed", json.dumps(mark)]

    summary = run_stage(*args, env=slack_api.env()).summary

    said = "marked failed by dr.lee at 2026-11-27T04:05:09Z (Airflow audit log: patch_dag_run)"
    assert summary["outcome"] == "failed"
    report = store.get_bytes(summary["report_uri"]).decode()
    assert f"- Outcome: **failed**: {said}" in report
    assert f"| ingest | failed | stopped: the run was {said} |" in report  # not an empty error cell
    assert "| validate | skipped |  |" in report
    assert f"- Slack: to {CHANNEL}" in report
    [message] = slack_api.messages
    assert "failed" in message["blocks"][0]["text"]["text"] and said in message["text"]
    assert f":raised_hand: The run was {said}" in block_text(message["blocks"])


def test_rerun_with_same_inputs_skips_without_posting_twice(run_stage, slack_api, bucket):
    run_stage(*notify_args(bucket), env=slack_api.env())
    again = run_stage(*notify_args(bucket), env=slack_api.env())
    forced = run_stage(*notify_args(bucket), "--force", env=slack_api.env())

    assert again.summary["status"] == "skipped"
    assert forced.summary["status"] == "done"
    assert len(slack_api.messages) == 2


def test_bad_states_flag_fails_before_writing(run_stage, store, bucket):
    args = notify_args(bucket)
    args[args.index("--states") + 1] = "[not json"
    result = run_stage(*args, check=False)

    assert result.returncode == 2
    assert "--states" in result.error_line and "not valid JSON" in result.error_line
    assert list(store.list(bucket)) == []


def test_unreachable_slack_is_transient_and_the_report_is_still_written(run_stage, store, bucket):
    from dermaops.embedded_s3 import free_port

    down = f"http://127.0.0.1:{free_port()}/api/"  # nothing listens there
    env = {"SLACK_BOT_TOKEN": TOKEN, "DERMAOPS_SLACK_CHANNEL": CHANNEL, "DERMAOPS_SLACK_API_URL": down}
    result = run_stage(*notify_args(bucket), env=env, check=False)

    assert result.returncode == 3  # a network failure: the stage contract's transient exit, retried
    assert "Traceback" not in result.stderr
    assert result.error_line.startswith(f"dermaops notify: error: cannot reach the Slack API at {down}")
    assert TOKEN not in result.stdout + result.stderr
    assert store.exists(bucket.join("runs", RUN_ID, "notify", "report.md"))
    assert not store.exists(bucket.join("runs", RUN_ID, "notify", "manifest.json"))


def test_the_summary_carries_the_promotion_decision_for_the_ui(run_stage, bucket):
    summary = run_stage(*notify_args(bucket), env={"SLACK_BOT_TOKEN": ""}).summary
    reason = SUCCESS_RESULTS["evaluate"]["summary"]["promotion_reason"]
    assert summary["promotion"] == {"promoted": True, "reason": reason}

    incident = "dermaops evaluate: error: promotion refused: the champion's checkpoint is missing (...)"
    states = {**SUCCESS_STATES, "evaluate": "failed"}
    results = {**SUCCESS_RESULTS, "evaluate": {"summary": None, "error": incident}}
    failed = run_stage(*notify_args(bucket, states, results), "--force", env={"SLACK_BOT_TOKEN": ""}).summary
    assert failed["outcome"] == "failed" and failed["promotion"] == {"promoted": None, "reason": incident}


def test_the_report_says_who_approved_or_rejected_a_challenger_that_awaited_approval(run_stage, slack_api, bucket):
    """require_approval: evaluate's decision is awaiting_approval; the report tells the answer the promote stage
    applied (approved / rejected by the reviewer, with the comment), or that none was."""
    gate = "macro_f1 0.6034 beats this run's Random Forest baseline (0.41); awaiting a reviewer's approval"
    evaluation = {**SUCCESS_RESULTS["evaluate"]["summary"], "promoted": False, "decision": "awaiting_approval"}
    evaluation |= {"promotion_reason": gate, "pending_uri": f"s3://b/registry/ham10000/pending/{RUN_ID}.json"}
    states = {**SUCCESS_STATES, "approval_needed": "success", "approve": "success", "promote": "success"}
    answers = {
        "rejected": {"decision": "rejected", "promoted": False, "reason": "rejected by dr.okafor: interval too wide"},
        "promoted": {
            "decision": "promoted",
            "promoted": True,
            "reason": f"approved by dr.lee (no comment); the gate: {gate}",
        },
    }
    for decision, answer in answers.items():
        results = {**SUCCESS_RESULTS, "evaluate": {"summary": evaluation, "error": None}}
        results["promote"] = {
            "summary": {"stage": "promote", "champion_uri": "s3://b/x/cnn.pt", **answer},
            "error": None,
        }
        summary = run_stage(*notify_args(bucket, states, results), "--force", env=slack_api.env()).summary
        assert summary["promotion"] == {"promoted": answer["promoted"], "reason": answer["reason"]}, decision
        text = block_text(slack_api.messages[-1]["blocks"])
        assert f"{'*promoted*' if answer['promoted'] else '*not promoted*'}: {answer['reason']}" in text
        assert ":white_check_mark: `approve` success" in text

    # Nobody answered (the approval task failed, e.g. cleared by hand): no answer was applied, and it says so.
    results = {**SUCCESS_RESULTS, "evaluate": {"summary": evaluation, "error": None}}
    states = {**states, "approve": "failed", "promote": "upstream_failed"}
    summary = run_stage(*notify_args(bucket, states, results), "--force", env=slack_api.env()).summary
    assert summary["outcome"] == "failed" and summary["promotion"]["promoted"] is False
    assert summary["promotion"]["reason"] == f"{gate}; no answer was applied (approve failed, promote upstream_failed)"


def test_the_approval_request_links_to_required_actions(slack_api):
    """The approval task's Slack message (dermaops.slack.approval_request, posted by its notifier)."""
    from dermaops import slack

    link = "http://airflow.example/dags/dermaops_ham10000/runs/r1/tasks/approve/required_actions?map_index=-1"
    evaluation = {**SUCCESS_RESULTS["evaluate"]["summary"], "promotion_reason": "beats the champion; awaiting"}
    text, blocks = slack.approval_request("dermaops_ham10000", "r1", evaluation, link)
    target = slack.SlackTarget.from_env(environ=slack_api.env())
    slack.post_message(target, text, blocks)
    [message] = slack_api.messages
    body = block_text(message["blocks"])
    assert "awaits approval" in message["text"] and f"<{link}|" in message["text"] and f"<{link}|" in body
    assert "Macro F1 0.6034 [0.5712, 0.6321]" in body and "Gate: beats the champion; awaiting" in body
    assert "champion.json changes only on Approve" in body
