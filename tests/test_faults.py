"""Faults that cut across stages, each reproduced for real: a password in the source URL on every failure
path, concurrent writers to one output prefix, a shared scratch directory, S3 that is wrong, down or
stopped mid-publish, Slack unreachable. The README's "Faults tried" table points here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dermaops.dataset import ARCHIVES
from dermaops.pipeline import STAGES as REGISTRY
from dermaops.redaction import redact, url_secrets
from dermaops.store import S3Uri, sha256_file

from tests.support.airflow_env import ROOT
from tests.support.faulty_files import add_zeros_member, first_jpeg, jpeg_declaring, pack_with_image
from tests.support.slack_api import TOKEN, block_text

FAST_RETRIES = ("--retries", "2", "--retry-base-delay", "0.01", "--retry-max-delay", "0.02")
PART_1, PART_2 = ARCHIVES
SECRET = "Pa55w0rd-s3cret"

if str(ROOT / "plugins") not in sys.path:
    sys.path.append(str(ROOT / "plugins"))


def one_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# -- bug 1: a password in the source URL ------------------------------------------------------------


def test_redact_hides_url_userinfo_tokens_and_signed_query_values():
    assert redact("GET http://reader:s3cr@t@host:8080/x?y=1 failed") == "GET http://***@host:8080/x?y=1 failed"
    assert redact("'https://tok3n@example.org/a'") == "'https://***@example.org/a'"
    assert redact("s3://bucket/key and http://host/x stay") == "s3://bucket/key and http://host/x stay"
    assert redact("token xoxb-123-abc leaked") == "token *** leaked"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abcdef&part=2"
    assert redact(signed) == "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&part=2"
    assert url_secrets("--source=http://reader:pw@h/x http://tok@h2/") == ["pw", "tok"]


class RecordingTI:
    """What the runner needs of a task instance: xcom_push."""

    def __init__(self):
        self.xcoms: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.xcoms[key] = value


@pytest.mark.parametrize(
    "fault, code",
    [("404", 2), ("503", 3), ("cut-off body", 3)],
)
def test_source_password_never_leaks_on_the_failure_paths(
    fault, code, http_source, bucket, stage_env, store, slack_api, tmp_path, monkeypatch, capsys
):
    """The whole chain: the stage's stderr (error line and retry warnings), the local runner's logged
    command line and forwarded lines, the XCom `error`, notify's report.md/report.json and Slack."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from dermaops_runner import local_mode
    from dermaops_runner.stages import spec_for

    if fault == "404":
        http_source.fail(PART_2, times=None, status=404)
    elif fault == "503":
        http_source.fail(PART_1, times=None, status=503)
    else:
        http_source.truncate(PART_2, after_bytes=100_000, times=None)
    url = http_source.base_url("28px").replace("http://", f"http://reader:{SECRET}@")
    argv = ["--source", url, "--datasets", str(bucket.join("ds")), *FAST_RETRIES]

    monkeypatch.setattr(local_mode, "resolve", lambda sets, s3_role: {})
    monkeypatch.setenv("DERMAOPS_SCRATCH_DIR", str(tmp_path / "scratch"))
    for name, value in stage_env.items():
        monkeypatch.setenv(name, value)
    op = local_mode.LocalStageOperator(spec=spec_for("ingest"), argv=argv, secrets=(), task_id="ingest")
    ti = RecordingTI()
    forwarded: list[str] = []
    original_forward = op._forward
    monkeypatch.setattr(op, "_forward", lambda stream, sink: (original_forward(stream, sink), forwarded.extend(sink)))
    expected = AirflowFailException if code == 2 else AirflowException
    with pytest.raises(expected) as failed:
        op.execute({"ti": ti})
    task_log = capsys.readouterr().out  # Airflow's structlog writes the task log to stdout here
    assert f"(exit {code})" in str(failed.value)
    if code == 3:
        assert not isinstance(failed.value, AirflowFailException)  # transient: Airflow retries it

    logged = task_log + "\n".join(forwarded)
    assert "running python -m dermaops ingest --source http://***@127.0.0.1:" in task_log
    if fault != "404":
        assert "retrying in" in logged  # the retry warnings were printed, and redacted
    error = ti.xcoms["error"]
    assert error.startswith("dermaops ingest: error:") and "http://***@127.0.0.1:" in error
    for text in (logged, str(failed.value), error):
        assert SECRET not in text

    # notify builds report.md, report.json and the Slack message from the XComs it is given; an XCom
    # written by an older runner may still carry the password, so notify redacts on its own too.
    results = {"ingest": {"summary": None, "error": error.replace("***", f"reader:{SECRET}")}}
    report_out = bucket.join("runs", "r1", "notify")
    notify = [
        sys.executable,
        "-m",
        "dermaops",
        "notify",
        "--run-id",
        "r1",
        "--states",
        json.dumps({"ingest": "failed", "validate": "upstream_failed"}),
        "--results",
        json.dumps(results),
        "--report-out",
        str(report_out),
    ]
    import subprocess

    proc = subprocess.run(notify, capture_output=True, text=True, env={**stage_env, **slack_api.env()}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report_md = store.get_bytes(report_out.join("report.md")).decode()
    report_json = store.get_bytes(report_out.join("report.json")).decode()
    [message] = slack_api.messages
    slack_text = block_text(message["blocks"]) + message.get("text", "")
    for text in (report_md, report_json, slack_text, proc.stdout, proc.stderr):
        assert SECRET not in text and TOKEN not in text
    assert "http://***@127.0.0.1:" in report_md and "http://***@127.0.0.1:" in slack_text


def test_local_runner_logs_a_redacted_command_line_on_success(
    http_source, bucket, stage_env, tmp_path, monkeypatch, capsys
):
    from dermaops_runner import local_mode
    from dermaops_runner.stages import spec_for

    url = http_source.base_url("28px").replace("http://", f"http://reader:{SECRET}@")
    monkeypatch.setattr(local_mode, "resolve", lambda sets, s3_role: {})
    monkeypatch.setenv("DERMAOPS_SCRATCH_DIR", str(tmp_path / "scratch"))
    for name, value in stage_env.items():
        monkeypatch.setenv(name, value)
    op = local_mode.LocalStageOperator(
        spec=spec_for("ingest"),
        argv=["--source", url, "--datasets", str(bucket.join("ds"))],
        secrets=(),
        task_id="ingest",
    )
    summary = op.execute({"ti": RecordingTI(), "outlet_events": {}})
    task_log = capsys.readouterr().out
    assert summary["status"] == "done" and summary["source"].startswith("http://***@127.0.0.1:")
    assert "running python -m dermaops ingest --source http://***@127.0.0.1:" in task_log
    assert SECRET not in task_log and SECRET not in json.dumps(summary)


def test_a_crash_traceback_is_redacted_too(run_stage, bucket, monkeypatch, tmp_path):
    """A bug (not a StageError) keeps its traceback and exit 1 (retried), but through the redacting handler."""
    shim = tmp_path / "shim"
    shim.mkdir()
    # sitecustomize runs at interpreter start: make the source parser crash on an unexpected exception.
    (shim / "sitecustomize.py").write_text(
        "import dermaops.sources as s\n"
        "def boom(spec, *a, **k):\n"
        "    raise RuntimeError(f'unexpected failure while opening {spec}')\n"
        "s.open_source = boom\n"
        "import dermaops.stages.ingest as i\n"
        "i.open_source = boom\n"
    )
    url = f"http://reader:{SECRET}@127.0.0.1:9/x"
    pythonpath = f"{shim}:{Path(__file__).resolve().parents[1] / 'tasks'}"
    result = run_stage(
        "ingest", "--source", url, "--datasets", str(bucket.join("ds")), check=False, env={"PYTHONPATH": pythonpath}
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "unexpected failure while opening http://***@127.0.0.1:9/x" in result.stderr
    assert SECRET not in result.stderr + result.stdout


# -- bug 3: a diverged training ---------------------------------------------------------------------

TINY_TRAIN = [
    "--arch", "resnet18", "--image-size", "28", "--batch-size", "32", "--max-train-images", "128",
    "--num-threads", "1", "--no-class-weights", "--patience", "0", "--epochs", "2", "--finetune-epochs", "0",
]  # fmt: skip


def test_a_diverging_training_stops_at_the_first_non_finite_loss_and_publishes_nothing(
    small_split, small_models, run_stage, bucket, store, tmp_path
):
    # `--lr inf` no longer gets past the flag checks, so the loss is made non-finite another way: initial
    # weights (--pretrained) whose head is NaN, a corrupt weights file a user could hand the stage.
    import torch
    from dermaops.checkpoint import load_checkpoint

    model, _ = load_checkpoint(store.download(S3Uri.parse(small_models["fitted"]).join("cnn.pt"), tmp_path / "f.pt"))
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    weights = tmp_path / "nan-head.pt"
    torch.save(model.state_dict(), weights)
    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/diverged/models/cnn")
    result = run_stage(
        "train", "--split", small_split["split_uri"], "--out", str(out), *TINY_TRAIN, "--pretrained", str(weights),
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    error = one_error_line(result)
    assert "training diverged: the loss is nan at epoch 1 (phase 1) step 1/" in error and "lower --lr" in error
    assert "epoch 1 (phase 1) done" not in result.stderr  # it stopped inside the first epoch
    assert not store.exists(out.join("manifest.json"))
    assert not store.exists(out.join("cnn.pt"))


def test_evaluate_refuses_a_model_with_non_finite_outputs(
    small_split, small_models, run_stage, bucket, store, tmp_path
):
    import torch
    from dermaops.checkpoint import load_checkpoint

    from tests.support.evaluation_inputs import _publish

    fitted = S3Uri.parse(small_models["fitted"]).join("cnn.pt")
    model, meta = load_checkpoint(store.download(fitted, tmp_path / "cnn.pt"))
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    nan_prefix = _publish(store, f"s3://{bucket.bucket}/runs/nan/models/cnn", model, meta, tmp_path)
    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/nan/evaluation")
    registry = S3Uri.parse(f"s3://{bucket.bucket}/registry/ham10000")
    result = run_stage(
        "evaluate", "--split", small_split["split_uri"], "--model", nan_prefix, "--out", str(out),
        "--registry", str(registry), "--gradcam-images", "2", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    error = one_error_line(result)
    assert f"{nan_prefix}/cnn.pt gives non-finite outputs (NaN/inf) for" in error and "refusing to score it" in error
    assert list(store.list(out)) == [] and list(store.list(registry)) == []


# -- bug 4: two writers to one output prefix ----------------------------------------------------------


def start_stage(stage_env: dict, scratch: Path, *argv: str):
    import subprocess

    env = {**stage_env, "DERMAOPS_SCRATCH_DIR": str(scratch)}
    cmd = [sys.executable, "-m", "dermaops", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_trainings_into_one_prefix_never_leave_a_manifest_that_lies(
    small_split, stage_env, bucket, store, tmp_path
):
    import hashlib

    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/shared/models/cnn")
    argv = ["train", "--split", small_split["split_uri"], "--out", str(out), *TINY_TRAIN, "--lr", "1e-3"]
    procs = {seed: start_stage(stage_env, tmp_path / f"s{seed}", *argv, "--seed", str(seed)) for seed in (1, 2)}
    finished = {seed: (*p.communicate(timeout=900), p.returncode) for seed, p in procs.items()}
    winners = [seed for seed, (_, _, code) in finished.items() if code == 0]
    assert winners, {seed: err[-2000:] for seed, (_, err, _) in finished.items()}
    for _, stderr, code in finished.values():
        if code != 0:  # the loser fails cleanly, with one line naming the prefix it lost
            assert code == 2, stderr[-3000:]
            [line] = [x for x in stderr.splitlines() if ": error:" in x]
            assert "took over" in line and str(out) in line and "publishes nothing" in line
    manifest = store.get_json(out.join("manifest.json"))
    assert manifest["config"]["seed"] in winners
    for name in ("cnn.pt", "cnn_phase1.pt", "history.json"):
        stored = hashlib.sha256(store.get_bytes(out.join(name))).hexdigest()
        assert stored == manifest["files"][name]["sha256"], name


def test_readers_refuse_a_file_rewritten_after_publication(
    small_split, small_models, run_stage, bucket, store, tmp_path
):
    """evaluate never scores a model other than the one its manifest names; train and baseline never read
    a split CSV other than the published one."""
    import shutil

    model = f"s3://{bucket.bucket}/runs/swapped/models/cnn"
    for name in ("manifest.json", "cnn.pt", "cnn_phase1.pt"):
        store.put_bytes(S3Uri.parse(model).join(name), store.get_bytes(S3Uri.parse(small_models["fitted"]).join(name)))
    # Another run's model lands on cnn.pt after the manifest was published.
    store.put_bytes(
        S3Uri.parse(model).join("cnn.pt"), store.get_bytes(S3Uri.parse(small_models["weak"]).join("cnn.pt"))
    )
    out = f"s3://{bucket.bucket}/runs/swapped/evaluation"
    result = run_stage("evaluate", "--split", small_split["split_uri"], "--model", model, "--out", out, check=False)
    assert result.returncode == 2
    error = one_error_line(result)
    assert f"checksum mismatch for {model}/cnn.pt" in error and "manifest.json" in error
    assert list(store.list(S3Uri.parse(out))) == []

    split = S3Uri.parse(f"s3://{bucket.bucket}/runs/swapped/split")
    source = S3Uri.parse(small_split["split_uri"])
    for uri, _ in store.list(source):
        store.put_bytes(split.join(uri.key[len(source.key) + 1 :]), store.get_bytes(uri))
    val = store.get_bytes(split.join("val.csv"))
    store.put_bytes(split.join("train.csv"), val)
    for stage, extra in (("train", TINY_TRAIN), ("train_baseline", ("--n-estimators", "10"))):
        shutil.rmtree(tmp_path / "scratch", ignore_errors=True)
        result = run_stage(
            stage, "--split", str(split), "--out", f"s3://{bucket.bucket}/runs/swapped/{stage}", *extra, check=False
        )
        assert result.returncode == 2, (stage, result.stderr[-2000:])
        assert f"checksum mismatch for {split}/train.csv" in one_error_line(result)


# -- bug 5: two processes, one DERMAOPS_SCRATCH_DIR -----------------------------------------------------


def test_two_ingests_sharing_a_scratch_dir_both_succeed(http_source, stage_env, bucket, store, tmp_path, pack_28px):
    shared = tmp_path / "shared-scratch"
    argv = ["ingest", "--source", http_source.base_url("28px"), "--datasets", str(bucket.join("ds")), *FAST_RETRIES]
    procs = [start_stage(stage_env, shared, *argv) for _ in range(2)]
    results = [(*p.communicate(timeout=600), p.returncode) for p in procs]
    for _, stderr, code in results:
        assert code == 0, stderr[-3000:]
        assert "Traceback" not in stderr
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _, _ in results]
    assert summaries[0]["dataset_version"] == summaries[1]["dataset_version"]
    # Both downloaded at the same time (neither found the other's published version), each in its own slot.
    gets = [r for r in http_source.logged(PART_2) if r.method == "GET"]
    assert len(gets) == 2, [r.path for r in gets]
    assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == ["slot-0", "slot-1"]
    # A later process (a retry) gets the lowest free slot back, with its caches.
    again = start_stage(stage_env, shared, *argv)
    stdout, stderr, code = (*again.communicate(timeout=600), again.returncode)
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["status"] == "skipped", stderr[-2000:]
    assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == ["slot-0", "slot-1"]


# -- S3 wrong, down, or gone in the middle of a publish ----------------------------------------------


class S3Outage:
    """A TCP relay in front of the loopback S3 that goes down (every connection cut, the port refusing
    new ones) at the first request whose bytes contain `trigger`, and comes back on `up()` on the same
    port: S3 stopped in the middle of a publish, then restarted with its data."""

    def __init__(self, target_url: str, trigger: bytes):
        import socket
        import threading
        from urllib.parse import urlsplit

        parts = urlsplit(target_url)
        self.target = (parts.hostname, parts.port)
        self.trigger, self.tripped = trigger, threading.Event()
        self.conns: list[socket.socket] = []
        self.port = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        import socket
        import threading

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(16)
        self.tripped.clear()
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.tripped.set()
        for sock in [self.listener, *self.conns]:
            try:
                sock.close()
            except OSError:
                pass
        self.conns.clear()

    def _accept(self, listener) -> None:
        import socket
        import threading

        while not self.tripped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.trigger and self.trigger in data:
                    self.trigger = b""  # once
                    self.down()
                    return
                dst.sendall(data)
        except OSError:
            pass


def test_s3_stopped_in_the_middle_of_a_publish_is_transient_leaves_no_manifest_and_a_rerun_completes(
    run_stage, s3_server, store, bucket, pack_28px
):
    datasets = bucket.join("ds")
    outage = S3Outage(s3_server.url, trigger=f"/{PART_2} HTTP/1.1".encode())
    env = {"DERMAOPS_S3_ENDPOINT_URL": outage.url}
    # part 1 is stored, then S3 goes away while part 2 is being uploaded.
    result = run_stage("ingest", "--source", str(pack_28px), "--datasets", str(datasets), env=env, check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    error = one_error_line(result)
    assert "cannot reach S3" in error and PART_2 in error
    stored = {uri.name for uri, _ in store.list(datasets)}
    assert PART_1 in stored and PART_2 not in stored and "manifest.json" not in stored

    outage.up()  # S3 is back, with what it had
    rerun = run_stage("ingest", "--source", str(pack_28px), "--datasets", str(datasets), env=env)
    summary = rerun.summary
    assert summary["status"] == "done"
    manifest = store.get_json(S3Uri.parse(summary["dataset_uri"]).join("manifest.json"))
    import hashlib

    for name, entry in manifest["files"].items():
        stored = store.get_bytes(S3Uri.parse(summary["dataset_uri"]).join(name))
        assert hashlib.sha256(stored).hexdigest() == entry["sha256"], name


def test_s3_down_is_transient(run_stage, bucket, pack_28px):
    from dermaops.embedded_s3 import free_port

    down = f"http://127.0.0.1:{free_port()}"
    env = {"DERMAOPS_S3_ENDPOINT_URL": down}
    result = run_stage("ingest", "--source", str(pack_28px), "--datasets", str(bucket.join("ds")), env=env, check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cannot reach S3 (EndpointConnectionError" in one_error_line(result)


def test_wrong_s3_credentials_fail_in_one_line_naming_the_credentials(run_stage, tmp_path, pack_28px):
    """A second S3 server that checks credentials (moto with authentication on): unknown keys are refused."""
    import subprocess
    import time

    from dermaops.embedded_s3 import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**__import__("os").environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import socket

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        env = {
            "DERMAOPS_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0",
            "AWS_SECRET_ACCESS_KEY": "wrong-secret-" + SECRET,
        }
        result = run_stage("ingest", "--source", str(pack_28px), "--datasets", "s3://dermaops/ds", env=env, check=False)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    error = one_error_line(result)
    assert "S3 rejected the credentials (InvalidAccessKeyId)" in error and "s3://dermaops/ds" in error
    assert SECRET not in result.stderr + result.stdout


# -- bad local sources --------------------------------------------------------------------------------


def test_a_missing_metadata_file_is_named(run_stage, bucket, store, pack_28px, tmp_path):
    import shutil

    source = tmp_path / "no-metadata"
    source.mkdir()
    for name in ARCHIVES:
        shutil.copy(pack_28px / name, source / name)
    result = run_stage("ingest", "--source", str(source), "--datasets", str(bucket.join("ds")), check=False)
    assert result.returncode == 2
    error = one_error_line(result)
    assert "no metadata file" in error and str(source / "HAM10000_metadata.csv") in error
    assert list(store.list(bucket)) == []


def test_a_truncated_local_zip_fails_and_publishes_nothing(run_stage, bucket, store, pack_28px, tmp_path):
    import shutil

    source = tmp_path / "truncated"
    source.mkdir()
    for name in ("HAM10000_metadata.csv", *ARCHIVES):
        shutil.copy(pack_28px / name, source / name)
    data = (source / PART_2).read_bytes()
    (source / PART_2).write_bytes(data[: len(data) // 2])  # a copy that stopped half-way
    result = run_stage("ingest", "--source", str(source), "--datasets", str(bucket.join("ds")), check=False)
    assert result.returncode == 2
    error = one_error_line(result)
    assert f"{PART_2} is not a zip archive" in error or f"{PART_2} is corrupt" in error
    assert list(store.list(bucket)) == []


def test_url_passwords_of_the_rendered_argv_are_registered_with_airflows_secrets_masker():
    """The rendered-fields view (and any task log line the runner does not write itself) goes through
    Airflow's masker, which masks the values it was told about."""
    from airflow.sdk._shared.secrets_masker import redact as airflow_redact
    from dermaops_runner.results import mask_url_secrets

    secret = "rendered-" + SECRET
    mask_url_secrets(["--source", f"https://reader:{secret}@example.org/ham", "--seed", "42"])
    assert airflow_redact(f"argv: ['--source', 'https://reader:{secret}@example.org/ham']") == (
        "argv: ['--source', 'https://reader:***@example.org/ham']"
    )


# -- issue 19: reliability, round two -------------------------------------------------------------------


def test_unsafe_names_never_become_local_paths(tmp_path):
    """The one helper every key, member or manifest name goes through before it is a local file."""
    from dermaops.errors import StageError
    from dermaops.safepath import local_path

    root = tmp_path / "inputs"
    root.mkdir()
    assert local_path(root, "a/ISIC_0024306.jpg", "test") == root / "a" / "ISIC_0024306.jpg"
    (root / "escape").symlink_to(tmp_path)  # a folder inside that leads outside
    for name, reason in (
        ("/tmp/canary.sh", "absolute path"),
        ("\\\\host\\share\\x", "absolute path"),
        ("C:/x", "absolute path"),
        ("../canary.sh", "'..' segment"),
        ("a/../../canary.sh", "'..' segment"),
        ("a//b.jpg", "empty or '.' segment"),
        ("./a.jpg", "empty or '.' segment"),
        ("", "empty"),
        ("a\x00b", "NUL byte"),
        ("escape/canary.sh", "resolves outside its folder"),
    ):
        with pytest.raises(StageError) as refused:
            local_path(root, name, "--images s3://b/p: object s3://b/p/x")
        assert str(refused.value).startswith("--images s3://b/p: object s3://b/p/x: refusing the name"), name
        assert f"({reason})" in str(refused.value) and "\n" not in str(refused.value), name
    assert not (tmp_path / "canary.sh").exists()


def test_predict_refuses_an_object_key_that_is_an_absolute_path_and_writes_nothing(
    run_stage, store, bucket, pack_sample, tmp_path
):
    """The issue's reproduction: `<prefix>//tmp/x` is the absolute /tmp/x relative to the prefix, and predict
    saved it there before any check (then exited 2 on something else)."""
    canary = tmp_path / "canary.sh"
    prefix = bucket.join("predin", "t2")
    _, jpeg = first_jpeg(pack_sample)
    store.put_bytes(prefix.join("ISIC_0024306.jpg"), jpeg)
    store.put_bytes(S3Uri(bucket.bucket, f"{prefix.key}/{canary}"), b"#!/bin/sh\necho owned\n")  # .../t2//tmp/...
    result = run_stage(
        "predict", "--model", "champion", "--registry", str(bucket.join("registry", "ham10000")),
        "--images", str(prefix), "--out", str(bucket.join("predictions", "b11")), check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    error = one_error_line(result)
    assert f"--images {prefix}: object s3://{bucket.bucket}/{prefix.key}/{canary}: refusing the name" in error
    assert "(absolute path)" in error
    assert not canary.exists()
    assert list(store.list(bucket.join("predictions"))) == []


def test_a_mirror_or_a_dataset_manifest_cannot_write_outside_its_folder(store, bucket, tmp_path):
    """The other places a name from S3 becomes a local path: scripts/run's mirror (devrun copy down) and a
    dataset version's files, whose names and version come from its manifest."""
    from dermaops import devrun
    from dermaops.dataset import Dataset
    from dermaops.errors import StageError

    mirror = bucket.join("mirror")
    store.put_bytes(mirror.join("runs", "r1", "report.md"), b"# report\n")
    store.put_bytes(S3Uri(bucket.bucket, f"{mirror.key}/{tmp_path}/canary.sh"), b"owned\n")
    with pytest.raises(StageError, match=r"copy down .*: refusing the name .* \(absolute path\)"):
        devrun.copy("down", tmp_path / "out", str(mirror))
    assert not (tmp_path / "canary.sh").exists() and not (tmp_path / "out").exists()  # nothing at all was written

    for version, name in (("v1", "../../canary.sh"), ("../..", "canary.sh")):
        manifest = {"dataset_version": version, "files": {name: {"sha256": "0" * 64, "size": 6}}}
        dataset = Dataset(store, bucket.join("datasets", "v1"), manifest, tmp_path / "scratch")
        with pytest.raises(StageError, match=r"dataset s3://.*: file: refusing the name .*\('\.\.' segment\)"):
            dataset.local(name)
    assert not (tmp_path / "canary.sh").exists()


BOMB_SIZE = (30000, 30000)


def test_an_image_declaring_30000x30000_fails_each_stage_that_decodes_it_in_one_line(
    run_stage, store, bucket, pack_sample, tmp_path
):
    """A decompression bomb in a dataset: validate (image facts), train_baseline and train (the image cache
    both build) refuse it naming the image and its declared size, exit 2, before decoding a pixel. Before,
    PIL's own DecompressionBombError was a crash (exit 1, retried)."""
    member, jpeg = first_jpeg(pack_sample)
    image_id = member.rsplit(".", 1)[0]
    bomb = jpeg_declaring(jpeg, *BOMB_SIZE)
    dataset = run_stage(
        "ingest", "--source", str(pack_with_image(pack_sample, tmp_path / "bomb", member, bomb)),
        "--datasets", str(bucket.join("datasets")),
    ).summary["dataset_uri"]  # fmt: skip
    declared = f"image {image_id} declares 30000x30000 pixels, over the limit of 50 megapixels"

    validation = run_stage(
        "validate", "--dataset", dataset, "--out", str(bucket.join("runs/b/validation")), check=False
    )
    assert validation.returncode == 2, validation.stderr[-3000:]
    assert "expect_column_values_to_be_in_set(decodes)" in one_error_line(validation)  # a failed image fact
    facts = store.get_bytes(bucket.join("runs/b/validation/image_facts.csv")).decode()
    assert declared in facts

    split = bucket.join("runs", "b", "split")
    run_stage("split", "--dataset", dataset, "--out", str(split))
    for stage, flags in (
        ("train_baseline", ["--n-estimators", "5"]),
        ("train", ["--image-size", "28", "--epochs", "1", "--finetune-epochs", "0", "--num-threads", "1"]),
    ):
        result = run_stage(
            stage, "--split", str(split), "--out", str(bucket.join("runs", "b", stage)), *flags, check=False
        )
        assert result.returncode == 2, (stage, result.stderr[-3000:])
        assert declared in one_error_line(result), stage
        assert list(store.list(bucket.join("runs", "b", stage))) == [], stage
    assert not store.exists(S3Uri.parse(dataset).join("cache", "28", "manifest.json"))


def test_a_512_mib_zip_member_is_refused_before_it_is_read(run_stage, store, bucket, pack_sample, tmp_path):
    """The issue's reproduction: a 0.72 MB zip holding a 512 MiB member passed ingest, and validate then held
    it in memory. Declared sizes and ratios are checked before a byte is decompressed; a version stored
    before this check is refused by every reader the same way."""
    import zipfile

    from dermaops.archives import MAX_MEMBER_BYTES, read_member
    from dermaops.dataset import Dataset
    from dermaops.errors import StageError

    source = pack_with_image(pack_sample, tmp_path / "bomb", *first_jpeg(pack_sample))
    before = (source / PART_2).stat().st_size
    add_zeros_member(source / PART_2, "ISIC_9999999.jpg", 512 * 2**20)
    assert (source / PART_2).stat().st_size - before < 2**20  # 512 MiB in under 1 MB of zip
    result = run_stage("ingest", "--source", str(source), "--datasets", str(bucket.join("ds")), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{PART_2} ({source / PART_2}): member ISIC_9999999.jpg declares 536,870,912 bytes uncompressed" in (
        one_error_line(result)
    )
    assert f"over the limit of {MAX_MEMBER_BYTES // 2**20} MiB" in result.stderr
    assert list(store.list(bucket)) == []

    # Under the size limit but a ratio no image has (10 MiB of zeros in a few KB): refused too.
    ratio = tmp_path / "ratio.zip"
    add_zeros_member(ratio, "ISIC_0000001.jpg", 10 * 2**20)
    with zipfile.ZipFile(ratio) as zf, pytest.raises(StageError, match=r"a ratio over the limit of 100:1"):
        read_member(zf, zf.getinfo("ISIC_0000001.jpg"), "ratio.zip")

    # A dataset version stored before the check: its readers (validate's facts, the image cache) refuse it.
    stored = bucket.join("old", "v0")
    for name in ("HAM10000_metadata.csv", PART_1, PART_2):
        store.put_file(stored.join(name), source / name)
    files = {n: {"sha256": sha256_file(source / n), "size": (source / n).stat().st_size} for n in (PART_1, PART_2)}
    dataset = Dataset(store, stored, {"dataset_version": "v0", "files": files}, tmp_path / "scratch")
    with pytest.raises(StageError, match="member ISIC_9999999.jpg declares 536,870,912 bytes"):
        for _ in dataset.iter_images():
            pass


TOKEN_SOURCE = "http://127.0.0.1:9/plain/small?key=DV-TOKEN-555"


def test_a_token_in_the_source_query_never_leaks(run_stage, bucket, store, stage_env, slack_api):
    """The issue's reproduction: Dataverse's `?key=` token reached the error line, notify's report.md and
    report.json, and Slack."""
    import subprocess

    result = run_stage(
        "ingest", "--source", TOKEN_SOURCE, "--datasets", str(bucket.join("b1")), "--retries", "0", check=False
    )
    assert result.returncode == 3, result.stderr[-3000:]  # nothing listens on port 9: transient
    error = one_error_line(result)
    assert "http://127.0.0.1:9/plain/small/HAM10000_metadata.csv?key=***" in error
    assert "DV-TOKEN-555" not in result.stderr + result.stdout

    # notify redacts on its own too (an XCom written by an older runner may still carry the token).
    results = {"ingest": {"summary": None, "error": error.replace("***", "DV-TOKEN-555")}}
    report_out = bucket.join("runs", "r1", "notify")
    notify = [
        sys.executable, "-m", "dermaops", "notify", "--run-id", "r1",
        "--states", json.dumps({"ingest": "failed", "validate": "upstream_failed"}),
        "--results", json.dumps(results), "--report-out", str(report_out),
    ]  # fmt: skip
    proc = subprocess.run(notify, capture_output=True, text=True, env={**stage_env, **slack_api.env()}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [message] = slack_api.messages
    slack_text = block_text(message["blocks"]) + message.get("text", "")
    report_md = store.get_bytes(report_out.join("report.md")).decode()
    report_json = store.get_bytes(report_out.join("report.json")).decode()
    for text in (report_md, report_json, slack_text, proc.stdout, proc.stderr):
        assert "DV-TOKEN-555" not in text
    assert "?key=***" in report_md and "?key=***" in slack_text
    for name in ("api_key", "apikey", "token", "access_token", "KEY"):
        assert redact(f"GET https://h/x?a=1&{name}=s3cr3t failed") == f"GET https://h/x?a=1&{name}=*** failed"
    assert url_secrets("https://h/x?key=s3cr3t&monkey=banana") == ["s3cr3t"]


@pytest.mark.parametrize(
    "kind, env, header",
    [
        ("dataverse", {"DERMAOPS_SOURCE_TOKEN": "DV-TOKEN-555"}, ("X-Dataverse-key", "DV-TOKEN-555")),
        ("plain", {"DERMAOPS_SOURCE_TOKEN": "DV-TOKEN-555"}, ("Authorization", "Bearer DV-TOKEN-555")),
        (
            "plain",
            {"DERMAOPS_SOURCE_TOKEN": "DV-TOKEN-555", "DERMAOPS_SOURCE_USER": "reader"},
            ("Authorization", "Basic cmVhZGVyOkRWLVRPS0VOLTU1NQ=="),  # reader:DV-TOKEN-555
        ),
        ("plain", {"DERMAOPS_SOURCE_TOKEN": "DV-TOKEN-555", "DERMAOPS_SOURCE_HOST": "dataverse.example"}, None),
    ],
)
def test_ingest_sends_the_source_token_from_its_environment_in_a_header(
    kind, env, header, run_stage, bucket, http_source
):
    """Where the token goes instead of the URL: the runner hands ingest DERMAOPS_SOURCE_TOKEN (from the
    connection dermaops_source); ingest sends it in the header the source reads, only to the configured
    host, and never prints it."""
    url = http_source.dataverse_url("sample") if kind == "dataverse" else http_source.base_url("sample")
    result = run_stage("ingest", "--source", url, "--datasets", str(bucket.join("ds")), env=env)
    assert result.summary["status"] == "done"
    assert "DV-TOKEN-555" not in result.stdout + result.stderr
    requests = http_source.requests
    assert requests and all("DV-TOKEN-555" not in r.path for r in requests)
    for request in requests:
        sent = {k.lower(): v for k, v in request.headers.items()}
        if header is None:  # DERMAOPS_SOURCE_HOST names another host: nothing is sent to this one
            assert "authorization" not in sent and "x-dataverse-key" not in sent, request.path
        else:
            assert sent.get(header[0].lower()) == header[1], request.path


def test_a_redirect_to_another_host_never_carries_the_source_token():
    """requests drops Authorization on a cross-host redirect but not other headers: Dataverse's token header
    would follow a download's redirect to the storage behind it. A redirect within the host keeps it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dermaops.sources import SourceCredentials
    from dermaops.sources.dataverse import TOKEN_HEADER
    from dermaops.sources.http import HttpClient
    from dermaops.sources.transfer import TransferSettings

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((f"{self.headers['Host']}{self.path}", self.headers.get(TOKEN_HEADER)))
            if self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", self.path.replace("/redirect/", "http://", 1))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        client = HttpClient(TransferSettings(retries=0), SourceCredentials("DV-TOKEN-555"), TOKEN_HEADER)
        # 127.0.0.1 -> localhost: another host name, so another host to requests.
        assert client.get_json(f"http://127.0.0.1:{port}/redirect/localhost:{port}/file") == {"ok": True}
        assert client.get_json(f"http://127.0.0.1:{port}/redirect/127.0.0.1:{port}/file") == {"ok": True}
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [
        (f"127.0.0.1:{port}/redirect/localhost:{port}/file", "DV-TOKEN-555"),
        (f"localhost:{port}/file", None),
        (f"127.0.0.1:{port}/redirect/127.0.0.1:{port}/file", "DV-TOKEN-555"),
        (f"127.0.0.1:{port}/file", "DV-TOKEN-555"),
    ]


def test_the_source_connection_is_what_ingest_gets(monkeypatch):
    """The runner's "source" secret set: the Airflow connection dermaops_source (password, login, host), else
    the worker's environment; its token is registered with Airflow's masker like the other secrets."""
    from dermaops.sources import TOKEN_ENV
    from dermaops_runner.credentials import SECRET_NAMES, resolve

    connection = {"conn_type": "http", "login": "reader", "password": "DV-TOKEN-555", "host": "dataverse.example"}
    monkeypatch.setenv("AIRFLOW_CONN_DERMAOPS_SOURCE", json.dumps(connection))
    assert resolve(("source",)) == {
        "DERMAOPS_SOURCE_TOKEN": "DV-TOKEN-555",
        "DERMAOPS_SOURCE_USER": "reader",
        "DERMAOPS_SOURCE_HOST": "dataverse.example",
    }
    monkeypatch.delenv("AIRFLOW_CONN_DERMAOPS_SOURCE")
    monkeypatch.setenv("DERMAOPS_SOURCE_TOKEN", "from-the-worker-env")
    assert resolve(("source",)) == {"DERMAOPS_SOURCE_TOKEN": "from-the-worker-env"}
    assert TOKEN_ENV in SECRET_NAMES
    # A stage's own redaction masks it wherever it appears, should a server echo it back.
    assert redact("403 for token from-the-worker-env") == "403 for token ***"


def test_scripts_run_refuses_a_source_with_a_credential_without_printing_it():
    import subprocess

    proc = subprocess.run(
        [str(ROOT / "scripts" / "run"), "--local", "--source", TOKEN_SOURCE],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "DV-TOKEN-555" not in proc.stdout + proc.stderr
    assert "run: --source: the source URL must carry no credential" in proc.stderr
    assert "dermaops_source" in proc.stderr and "DERMAOPS_SOURCE_TOKEN" in proc.stderr
    assert "embedded S3" not in proc.stderr  # refused before anything started

    from dermaops.devrun import main as devrun

    with pytest.raises(SystemExit, match="must carry no credential"):
        devrun(["conf", "quick-cpu", "--extra", json.dumps({"source": "https://reader:pw@host/ham"})])


@pytest.mark.parametrize("stage", [s.name for s in REGISTRY])
def test_every_stage_has_a_working_help(stage, capsys):
    """`evaluate --help` crashed on the "95 %" of a help text (argparse %-formats help strings)."""
    from dermaops import cli

    _, modules = cli.build_parser()
    assert stage in modules  # a stage whose module is missing would be silently left out of the CLI
    with pytest.raises(SystemExit) as done:
        cli.main([stage, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dermaops {stage} ") and "--scratch-dir" in out
    if stage == "evaluate":
        assert "bootstrap resamples for the 95 % intervals" in " ".join(out.split())


def test_every_test_the_readme_fault_table_names_exists():
    """Each row of the README's "Faults tried" table names the tests that keep it true; they must exist."""
    import ast
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Faults tried") :].split("\n## ", 1)[0]
    named = 0
    for row in (line for line in table.splitlines() if line.startswith("| ") and "tests/" in line):
        current = None
        for path, test in re.findall(r"`(?:(tests/[\w/]+\.py))?(?:::([\w\[\]-]+))?`", row.split("|")[-2]):
            current = path or current
            assert current, row
            source = ROOT / current
            assert source.is_file(), (current, row)
            if test:
                functions = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
                assert test.split("[")[0] in functions, (current, test)
                named += 1
    assert named >= 20
