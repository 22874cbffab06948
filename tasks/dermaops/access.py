"""Least privilege in the artifact bucket: each kind of stage has its own S3 key, which may write only
the prefixes that kind of stage writes.

The roles and what they may write (every role may list the bucket and read every object):

    data      ingest, validate, split, changes, notify   datasets/*, runs/*
    train     train, train_baseline                      runs/*, datasets/*/cache/*
    registry  evaluate, promote                          runs/*, registry/*, datasets/*/cache/*
    predict   predict                                    predictions/*, registry/*/monitoring/*
    reader    the registry view of the web UI            nothing

`datasets/*/cache/*` is the decoded-image cache of a dataset version (dermaops.imagecache), which
whichever stage first needs a frame builds; the dataset's own files stay the data stages'.
`registry/*/monitoring/*` holds the prediction monitoring records (dermaops.monitoring), so predict
never touches champion.json. Which role each stage has is in the stage registry (dermaops.pipeline).

The policies are IAM policy documents in `policies/<role>.json` beside this file, with the bucket
as `${DERMAOPS_BUCKET}`: the compose deployment's minio-init creates one MinIO user and policy per
role from them (scripts/minio-least-privilege.sh), and the embedded S3 enforces the same documents
(dermaops.embedded_s3 --least-privilege). Each role's key id is `dermaops-<role>`; its secret is
DERMAOPS_S3_<ROLE>_SECRET_KEY in the deployment's .env. Airflow hands a stage its role's key from
the connection `dermaops_s3_<role>` (plugins/dermaops_runner/credentials.py).

Standard library only: the DAG file, the Airflow plugins and the S3 stand-in import it.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("data", "train", "registry", "predict", "reader")
POLICY_DIR = Path(__file__).with_name("policies")
BUCKET_PLACEHOLDER = "${DERMAOPS_BUCKET}"


def _known(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown S3 role {role!r} (roles: {', '.join(ROLES)})")
    return role


def policy(role: str, bucket: str) -> dict:
    """The IAM policy document of `role` for `bucket`."""
    text = (POLICY_DIR / f"{_known(role)}.json").read_text()
    return json.loads(text.replace(BUCKET_PLACEHOLDER, bucket))


def key_id(role: str) -> str:
    """The role's access key id (MinIO wants 3 to 20 characters)."""
    return f"dermaops-{_known(role)}"


def secret_env(role: str) -> str:
    """The .env variable holding the role's secret key."""
    return f"DERMAOPS_S3_{_known(role).upper()}_SECRET_KEY"


def conn_id(role: str) -> str:
    """The Airflow connection that holds the role's key."""
    return f"dermaops_s3_{_known(role)}"


def conn_env(role: str) -> str:
    """The environment variable that defines conn_id(role) (Airflow's AIRFLOW_CONN_<ID>)."""
    return f"AIRFLOW_CONN_{conn_id(role).upper()}"


def connection_json(role: str, secret: str, endpoint_url: str, region: str = "us-east-1") -> str:
    """The value of conn_env(role): an `aws` connection in Airflow's JSON form."""
    extra = {"endpoint_url": endpoint_url, "region_name": region}
    return json.dumps({"conn_type": "aws", "login": key_id(role), "password": secret, "extra": extra})
