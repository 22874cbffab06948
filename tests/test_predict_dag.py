"""The `dermaops_predict` DAG: parses thin (no look-ups, torch image, asset schedule), picks the folder an
Asset event names, and runs end to end with `airflow dags test` in local mode on full-resolution JPEGs
in the loopback S3 with the registry's real champion."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
from dermaops_runner.templating import run_key

from tests.support.airflow_env import ROOT, airflow_base_env
from tests.support.registry import read_csv, sample_jpegs

DAG_ID = "dermaops_predict"


@pytest.fixture
def parsed(tmp_path, monkeypatch):
    """Both DAG files parsed with network, connection and Variable look-ups forbidden."""
    for name, value in airflow_base_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DERMAOPS_BUCKET", "lesions")
    monkeypatch.setenv("DERMAOPS_RUNNER", "docker")
    monkeypatch.setenv("DERMAOPS_GPU", "1")
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Connection, Variable

    def forbidden(*args, **kwargs):
        raise AssertionError("look-up while parsing the DAG file")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(BaseHook, "get_connection", forbidden)
    monkeypatch.setattr(Connection, "get", forbidden)
    monkeypatch.setattr(Variable, "get", forbidden)
    bag = DagBag(dag_folder=ROOT / "dags")
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags[DAG_ID]


def test_predict_dag_is_thin_asset_scheduled_and_runs_in_the_torch_image(parsed):
    from airflow.serialization.serialized_objects import DagSerialization

    assert parsed.task_ids == ["predict"]
    task = parsed.get_task("predict")
    assert task.image.startswith("dermaops-torch:") and task.device_requests  # GPU-capable stage
    assert task.command[:4] == ["python", "-m", "dermaops", "predict"]
    argv = task.command
    assert argv[argv.index("--registry") + 1] == "s3://lesions/registry/ham10000"
    assert [a.uri for a in task.outlets] == ["s3://lesions/predictions"]
    restored = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(parsed))
    assert [a.uri for _, a in restored.timetable.asset_condition.iter_assets()] == ["s3://lesions/incoming/ham10000"]
    params = parsed.params
    assert params["images"] == "s3://lesions/incoming/ham10000" and params["model"] == "champion"
    assert params.get_param("gradcam").schema["enum"] == ["none", "predicted", "mel"]
    assert all(params.get_param(name).description for name in params.keys())


def _events(*extras):
    return {"incoming": [SimpleNamespace(extra=extra) for extra in extras]}


def test_the_folder_comes_from_the_asset_event_else_the_param():
    from dermaops_runner.incoming import images_to_predict

    params = {"images": "s3://b/incoming/ham10000"}
    assert images_to_predict(params, None) == "s3://b/incoming/ham10000"  # triggered from the UI
    assert images_to_predict(params, _events({})) == "s3://b/incoming/ham10000"  # event without a folder
    one = _events({"images": "s3://b/incoming/ham10000/batch-7/"})
    assert images_to_predict(params, one) == "s3://b/incoming/ham10000/batch-7/"
    # Two folders coalesced into one run: both are read (their common prefix), none is dropped.
    two = _events({"images": "s3://b/incoming/ham10000/a/x"}, {"images": "s3://b/incoming/ham10000/a/y"})
    assert images_to_predict(params, two) == "s3://b/incoming/ham10000/a"
    far = _events({"images": "s3://b/one"}, {"images": "s3://c/two"})
    assert images_to_predict(params, far) == "s3://b/incoming/ham10000"  # never the whole bucket


@pytest.mark.slow
def test_predict_dag_end_to_end_in_local_mode(airflow_env, s3_server, promoted_registry, pack_sample, store, tmp_path):
    bucket = promoted_registry["bucket"]
    folder = f"s3://{bucket}/incoming/ham10000/batch-e2e"
    jpegs = sample_jpegs(pack_sample, tmp_path / "jpegs", count=4)
    for path in jpegs:
        store.put_bytes(f"{folder}/{path.name}", path.read_bytes())
    env = {**s3_server.env, "DERMAOPS_BUCKET": bucket, "DERMAOPS_RUNNER": "local", "SLACK_BOT_TOKEN": ""}
    conf = {"images": folder, "gradcam": "predicted", "tta": False}

    proc = airflow_env.run("dags", "test", DAG_ID, "--conf", json.dumps(conf), env=env, check=False)
    run_id = airflow_env.latest_run_id(DAG_ID)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert airflow_env.run_state(run_id, DAG_ID) == "success"
    summary = airflow_env.xcoms(run_id, dag_id=DAG_ID)["predict"]
    out = f"s3://{bucket}/predictions/{run_key(run_id)}"
    assert summary["predictions_uri"] == f"{out}/predictions.csv"
    assert summary["n_images"] == 4 and summary["resolved_from"] == "champion"
    assert summary["model_sha256"] == promoted_registry["champion"]["model_sha256"]
    table = read_csv(store, summary["predictions_uri"])
    assert sorted(table["image_id"]) == sorted(p.stem for p in jpegs)
    assert table["gradcam"].str.startswith(f"{out}/gradcam/").all()
    assert store.exists(f"{out}/manifest.json")
