"""Credentials a stage receives, resolved at EXECUTE time (never when the DAG file is parsed).

Each set comes from an Airflow connection when one is defined, else from the worker's environment,
so a compose deployment keeps secrets in connections (or `.env`) and a laptop run needs none:

- "s3": the key of the stage's role (dermaops.access: which prefixes it may write), from the connection
  `dermaops_s3_<role>` (type aws: login = access key id, password = secret key, extra {"endpoint_url":
  ..., "region_name": ...}); without one, the connection `dermaops_s3` (one key for every stage: a
  deployment that does not separate them, logged as such); else AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, DERMAOPS_S3_ENDPOINT_URL / AWS_ENDPOINT_URL(_S3).
- "slack": connection `slack_api_default` (type slack: password = bot token, extra {"channel": ...,
  "base_url": ...}) or SLACK_BOT_TOKEN, DERMAOPS_SLACK_CHANNEL, DERMAOPS_SLACK_API_URL.
- "source": connection `dermaops_source` (dermaops.config.SOURCE_CONNECTION; any type: password = the data
  source's API token or password, login = its user for HTTP basic auth, host = the only host it is sent to)
  or DERMAOPS_SOURCE_TOKEN, DERMAOPS_SOURCE_USER, DERMAOPS_SOURCE_HOST (dermaops.sources). Neither is
  needed for a public source; the `source` param itself may carry no credential (dermaops.config).

The result is a plain {NAME: value} dict for a subprocess environment or DockerOperator's
`private_environment` (which Airflow does not render into the UI).
"""

from __future__ import annotations

import logging
import os

from dermaops import access
from dermaops.config import SOURCE_CONNECTION
from dermaops.redaction import ENV_SECRETS

S3_CONN_ID = "dermaops_s3"
SLACK_CONN_ID = "slack_api_default"

S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "DERMAOPS_S3_ENDPOINT_URL",
)
SLACK_ENV = ("SLACK_BOT_TOKEN", "DERMAOPS_SLACK_CHANNEL", "DERMAOPS_SLACK_API_URL")
SECRET_NAMES = ENV_SECRETS  # the values registered with Airflow's masker, as the stages' own redaction masks them

log = logging.getLogger(__name__)


def _connection(conn_id: str):
    """The Airflow connection, or None when it is not defined anywhere (DB, env, secrets backend)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _from_env(names: tuple[str, ...]) -> dict[str, str]:
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def s3_env(role: str) -> dict[str, str]:
    """The S3 environment of a stage whose role is `role` (dermaops.access)."""
    conn_id = access.conn_id(role)
    conn = _connection(conn_id)
    if conn is None:
        conn_id, conn = S3_CONN_ID, _connection(S3_CONN_ID)
        if conn is not None:
            log.warning("no connection %s: using %s, one S3 key for every stage", access.conn_id(role), S3_CONN_ID)
    if conn is None:
        return _from_env(S3_ENV)
    extra = conn.extra_dejson
    env = {
        "AWS_ACCESS_KEY_ID": conn.login or "",
        "AWS_SECRET_ACCESS_KEY": conn.password or "",
        "AWS_DEFAULT_REGION": extra.get("region_name") or "us-east-1",
        "DERMAOPS_S3_ENDPOINT_URL": extra.get("endpoint_url") or "",
    }
    log.info("S3 credentials from connection %s (key %s)", conn_id, conn.login)
    return {k: v for k, v in env.items() if v}


def slack_env() -> dict[str, str]:
    conn = _connection(SLACK_CONN_ID)
    env = _from_env(SLACK_ENV)
    if conn is None:
        return env
    extra = conn.extra_dejson
    env["SLACK_BOT_TOKEN"] = conn.password or ""
    if extra.get("channel"):
        env["DERMAOPS_SLACK_CHANNEL"] = extra["channel"]
    if extra.get("base_url"):
        env["DERMAOPS_SLACK_API_URL"] = extra["base_url"]
    log.info("Slack credentials from connection %s", SLACK_CONN_ID)
    return {k: v for k, v in env.items() if v}


def source_env() -> dict[str, str]:
    from dermaops.sources import HOST_ENV, TOKEN_ENV, USER_ENV

    conn = _connection(SOURCE_CONNECTION)
    if conn is None:
        return _from_env((TOKEN_ENV, USER_ENV, HOST_ENV))
    env = {TOKEN_ENV: conn.password or "", USER_ENV: conn.login or "", HOST_ENV: conn.host or ""}
    log.info("data source credentials from connection %s", SOURCE_CONNECTION)
    return {k: v for k, v in env.items() if v}


RESOLVERS = {"s3": s3_env, "slack": slack_env, "source": source_env}


def resolve(sets: tuple[str, ...], s3_role: str | None = None) -> dict[str, str]:
    """The environment for these credential sets ("s3" with the key of `s3_role`); secret values are
    registered with Airflow's log masker, so a stage that echoes one shows *** in the task log."""
    from airflow.sdk.log import mask_secret

    env: dict[str, str] = {}
    for name in sets:
        if name not in RESOLVERS:
            raise ValueError(f"unknown secret set {name!r} (known: {', '.join(RESOLVERS)})")
        if name == "s3" and s3_role is None:
            raise ValueError("the s3 credential set needs the stage's S3 role (dermaops.access.ROLES)")
        env.update(s3_env(s3_role) if name == "s3" else RESOLVERS[name]())
    for name, value in env.items():
        if name in SECRET_NAMES:
            mask_secret(value, name)
    return env
