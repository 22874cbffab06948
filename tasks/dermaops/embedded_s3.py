"""The embedded default artifact store: a real S3 HTTP endpoint on loopback (moto's server mode).

Used by the README's run command, by the tests and, as a stand-in for MinIO, by the compose stack on a
machine without an image registry; production points at MinIO or AWS instead.

    python -m dermaops.embedded_s3 --port 9900 --bucket dermaops --env-file s3-env.json
    python -m dermaops.embedded_s3 --least-privilege --bucket dermaops --env-file s3-env.json

By default the server accepts any credentials. With --least-privilege it enforces the policies of
dermaops.access as MinIO does in the compose deployment: an admin key may do anything, and each role's
key (`dermaops-<role>`) may write only its prefixes (a train key writing registry/ gets AccessDenied).
The secrets come from the environment as the compose stack's .env names them (MINIO_ROOT_USER /
MINIO_ROOT_PASSWORD for the admin, DERMAOPS_S3_<ROLE>_SECRET_KEY for each role), else fresh random
ones; the env file then holds the admin key as AWS_* and each role's Airflow connection
(AIRFLOW_CONN_DERMAOPS_S3_<ROLE>), which is how the DAG hands every stage its own key.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path

from dermaops import access

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "dermaops-local",
    "AWS_SECRET_ACCESS_KEY": "dermaops-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedS3:
    """A ThreadedMotoServer on 127.0.0.1. `env` is what a client process needs to reach it."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port()
        self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**DUMMY_ENV, "DERMAOPS_S3_ENDPOINT_URL": self.url}

    def start(self) -> EmbeddedS3:
        from moto.server import ThreadedMotoServer

        # moto binds inside its server thread and only logs a failure there; check the port here
        # so a busy port fails the caller instead of leaving a process that serves nothing.
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise RuntimeError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc

        # One access-log line per S3 request is noise; in a process that also runs a stage (tests, the
        # dev runner) it would interleave with the stage's own log lines on stderr.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def least_privilege_keys(environ=os.environ) -> tuple[tuple[str, str], dict[str, str]]:
    """The admin key and every role's secret: the deployment's (.env names) where set, else fresh."""
    admin = (
        environ.get("MINIO_ROOT_USER") or "dermaops-admin",
        environ.get("MINIO_ROOT_PASSWORD") or secrets.token_hex(16),
    )
    roles = {role: environ.get(access.secret_env(role)) or secrets.token_hex(16) for role in access.ROLES}
    return admin, roles


def enforce_policies(bucket: str, admin: tuple[str, str], roles: dict[str, str]) -> None:
    """Turn on moto's IAM checks with an admin user and one user per role of dermaops.access.

    Process-wide: moto keeps its backends and its "check credentials" switch per process, so this is
    for a server in a process of its own (main(), the compose stand-in), never inside the tests'
    process, whose session server accepts any key."""
    from moto import settings
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.models import iam_backends

    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]

    def user(name: str, key: str, secret: str, document: dict) -> None:
        iam.create_user("us-east-1", name)
        iam.put_user_policy(name, "dermaops", json.dumps(document))
        # moto generates the key pair; the deployment's own (from .env) must be the one that works.
        key_pair = iam.create_access_key(name)
        key_pair.access_key_id, key_pair.secret_access_key = key, secret

    user("dermaops-admin", *admin, ADMIN_POLICY)
    for role, secret in roles.items():
        user(access.key_id(role), access.key_id(role), secret, access.policy(role, bucket))
    # 0 requests without checks from now on: every request must be signed by one of these keys.
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dermaops.embedded_s3", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--bucket", default="dermaops", help="bucket to create at start")
    parser.add_argument("--env-file", type=Path, help="write the client environment here as JSON once ready")
    parser.add_argument(
        "--least-privilege",
        action="store_true",
        help="enforce dermaops.access's policies: each role's key may write only its prefixes",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="keep the objects across restarts: loaded from here at start, saved here on SIGTERM/SIGINT",
    )
    args = parser.parse_args()

    env = dict(DUMMY_ENV)
    if args.least_privilege:
        admin, roles = least_privilege_keys()
        env |= {"AWS_ACCESS_KEY_ID": admin[0], "AWS_SECRET_ACCESS_KEY": admin[1]}
    os.environ.update(env)
    # Users, policies and stored objects go into moto's backends before the port opens: a client that
    # connects at once never meets a server that accepts any key or lacks what it stored before.
    if args.least_privilege:
        enforce_policies(args.bucket, admin, roles)
    if args.state_dir:
        from dermaops import s3_snapshot

        try:
            loaded = s3_snapshot.load(args.state_dir)
        except s3_snapshot.SnapshotError as exc:
            # Exit without serving, so the damaged snapshot is never overwritten by an empty one.
            print(f"embedded S3: error: {exc}", file=sys.stderr)
            return 1
        print(f"embedded S3: {loaded} objects loaded from {args.state_dir}", file=sys.stderr, flush=True)
    try:
        server = EmbeddedS3(port=args.port or None, host=args.host).start()
    except RuntimeError as exc:
        print(f"embedded S3: error: {exc}", file=sys.stderr)
        return 1
    os.environ["DERMAOPS_S3_ENDPOINT_URL"] = server.url
    from dermaops.store import ArtifactStore

    ArtifactStore().ensure_bucket(args.bucket)
    if args.env_file:
        client_env = {**server.env, **env, "DERMAOPS_BUCKET": args.bucket}
        if args.least_privilege:
            for role, secret in roles.items():
                client_env[access.conn_env(role)] = access.connection_json(role, secret, server.url)
        tmp = args.env_file.with_suffix(".tmp")
        # The file holds secrets: readable by its owner only, from the first byte on.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(client_env))
        tmp.replace(args.env_file)
    policies = "each role's key writes only its prefixes" if args.least_privilege else "any key accepted"
    print(f"embedded S3 listening on {server.url}, bucket s3://{args.bucket} ({policies})", file=sys.stderr, flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    # The server stops first: no write is acknowledged after the snapshot was taken (moto's backend stays
    # in this process's memory until it exits).
    server.stop()
    if args.state_dir:
        try:
            saved = s3_snapshot.save(args.state_dir)
        except s3_snapshot.SnapshotError as exc:
            print(f"embedded S3: error: {exc}", file=sys.stderr)
            return 1
        print(f"embedded S3: {saved} objects saved to {args.state_dir}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
