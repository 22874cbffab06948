"""Least privilege in the bucket (dermaops.access): each stage's S3 key writes only its prefixes.

The policies are enforced by a real S3 endpoint that checks every request's signature against an IAM
policy (`python -m dermaops.embedded_s3 --least-privilege`: moto's IAM checks, the same documents
MinIO gets in the compose stack). The whole DAG runs on that server in test_dag_e2e's local-mode test,
each stage with its own key, which shows that every stage's policy covers what it does.
"""

from __future__ import annotations

import json

import pytest
from dermaops import access
from dermaops.errors import StageError
from dermaops.pipeline import STAGES

# Who may write where: key -> the roles whose key may write it (the admin may write everything).
WRITES = {
    "datasets/ham10000/v1/HAM10000_metadata.csv": {"data"},
    "datasets/ham10000/v1/cache/64/manifest.json": {"data", "train", "registry"},
    "runs/r1/models/cnn/cnn.pt": {"data", "train", "registry"},
    "registry/ham10000/model_card.md": {"registry"},
    "registry/ham10000/history/0001.json": {"registry"},
    "registry/ham10000/monitoring/b1.json": {"registry", "predict"},
    "predictions/r1/predictions.csv": {"predict"},
    "sources/pack/HAM10000_metadata.csv": set(),
}


def test_every_stage_has_a_role_and_every_role_a_policy_for_its_bucket():
    assert {s.s3_role for s in STAGES} <= set(access.ROLES)
    assert sorted(p.stem for p in access.POLICY_DIR.glob("*.json")) == sorted(access.ROLES)
    for role in access.ROLES:
        text = json.dumps(access.policy(role, "my-bucket"))
        assert access.BUCKET_PLACEHOLDER not in text
        resources = [r for st in access.policy(role, "my-bucket")["Statement"] for r in st["Resource"]]
        assert all(r.startswith("arn:aws:s3:::my-bucket") for r in resources), role
    # The registry is written by evaluate and promote only.
    assert {s.name for s in STAGES if s.s3_role == "registry"} == {"evaluate", "promote"}
    assert {s.name for s in STAGES if s.s3_role == "train"} == {"train", "train_baseline"}
    with pytest.raises(ValueError, match="unknown S3 role 'admin' \\(roles: data, train, registry, predict, reader\\)"):
        access.key_id("admin")


def test_each_role_writes_only_its_prefixes(least_privilege_s3):
    bucket = least_privilege_s3.bucket
    admin = least_privilege_s3.store()
    champion = bucket.join("registry", "ham10000", "champion.json")
    admin.put_json(champion, {"run_id": "the-champion"})

    for role in access.ROLES:
        store = least_privilege_s3.store(role)
        # Every role reads and lists the bucket.
        assert store.get_json(champion) == {"run_id": "the-champion"}
        assert champion in {uri for uri, _ in store.list(bucket.join("registry"))}
        for key, writers in WRITES.items():
            uri = bucket.join(key)
            if role in writers:
                store.put_bytes(uri, b"x")
                store.delete(uri)
            else:
                with pytest.raises(
                    StageError, match=f"^access denied: this S3 key may not write {uri} \\(AccessDenied\\)$"
                ):
                    store.put_bytes(uri, b"x")
        if role != "registry":
            with pytest.raises(StageError, match="access denied: this S3 key may not delete"):
                store.delete(champion)
    # Nothing a refused key tried changed what was stored.
    assert admin.get_json(champion) == {"run_id": "the-champion"}


def test_a_key_the_server_does_not_know_is_refused_in_one_line(least_privilege_s3):
    from dermaops.store import ArtifactStore, make_client

    wrong = {**least_privilege_s3.role_env("train"), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    client = make_client(wrong)
    with pytest.raises(
        StageError, match=r"^S3 rejected the credentials \(SignatureDoesNotMatch\) while trying to list"
    ):
        list(ArtifactStore(client).list(least_privilege_s3.bucket.join("runs")))


@pytest.mark.slow
def test_train_cannot_write_the_registry(least_privilege_s3, small_pack, tmp_path, run_stage):
    """The real stages, each with its role's key: ingest and split (data) prepare a split, then a training
    stage (train_baseline, role train) told to write its model into registry/ stops at that write with one
    line, and the champion stays as it was. Pointed at its run prefix, the same stage succeeds."""
    lp = least_privilege_s3
    bucket = lp.bucket
    champion = bucket.join("registry", "ham10000", "champion.json")
    lp.store().put_json(champion, {"run_id": "the-champion"})

    datasets = bucket.join("datasets", "ham10000")
    ingest = run_stage("ingest", "--source", str(small_pack), "--datasets", str(datasets), env=lp.role_env("data"))
    dataset_uri = ingest.summary["dataset_uri"]
    split_uri = str(bucket.join("runs", "lp", "split"))
    run_stage("split", "--dataset", dataset_uri, "--out", split_uri, env=lp.role_env("data"))

    argv = ("train_baseline", "--split", split_uri, "--n-estimators", "5", "--seed", "1")
    into_registry = bucket.join("registry", "ham10000", "model")
    refused = run_stage(*argv, "--out", str(into_registry), check=False, env=lp.role_env("train"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert f"error: access denied: this S3 key may not write {into_registry}/" in refused.error_line
    assert lp.store().get_json(champion) == {"run_id": "the-champion"}
    assert not list(lp.store().list(into_registry))

    ok = run_stage(*argv, "--out", str(bucket.join("runs", "lp", "models", "baseline")), env=lp.role_env("train"))
    assert ok.summary["model_uri"] == str(bucket.join("runs", "lp", "models", "baseline", "baseline.joblib"))


def test_the_runner_hands_each_stage_its_roles_key(monkeypatch):
    """plugins/dermaops_runner/credentials.py: the connection dermaops_s3_<role> first; without it, the
    connection dermaops_s3 (one key for every stage); without either, the worker's environment."""
    from dermaops_runner.credentials import resolve

    endpoint = "http://minio:9000"
    monkeypatch.setenv(access.conn_env("train"), access.connection_json("train", "train-secret", endpoint))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    train = resolve(("s3",), "train")
    assert (train["AWS_ACCESS_KEY_ID"], train["AWS_SECRET_ACCESS_KEY"]) == ("dermaops-train", "train-secret")
    assert train["DERMAOPS_S3_ENDPOINT_URL"] == endpoint
    # No connection for the registry role, none shared: the worker's environment.
    assert resolve(("s3",), "registry")["AWS_ACCESS_KEY_ID"] == "worker-key"
    shared = {"conn_type": "aws", "login": "one-key", "password": "one-secret", "extra": {"endpoint_url": endpoint}}
    monkeypatch.setenv("AIRFLOW_CONN_DERMAOPS_S3", json.dumps(shared))
    assert resolve(("s3",), "registry")["AWS_ACCESS_KEY_ID"] == "one-key"
    assert resolve(("s3",), "train")["AWS_ACCESS_KEY_ID"] == "dermaops-train"
    with pytest.raises(ValueError, match="the s3 credential set needs the stage's S3 role"):
        resolve(("s3",))
