"""The embedded default artifact store: a real S3 HTTP endpoint on loopback (moto's server mode).

Used by the README's run command and by the tests; production points at MinIO or AWS instead.
Credentials for it are dummies: the server accepts any.

    python -m dermaops.embedded_s3 --port 9900 --bucket dermaops --state-dir .dermaops/s3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dermaops.embedded_s3", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick a free one)")
    parser.add_argument("--bucket", default="dermaops", help="bucket to create at start")
    parser.add_argument("--env-file", type=Path, help="write the client environment here as JSON once ready")
    args = parser.parse_args()

    os.environ.update(DUMMY_ENV)
    try:
        server = EmbeddedS3(port=args.port or None).start()
    except RuntimeError as exc:
        print(f"embedded S3: error: {exc}", file=sys.stderr)
        return 1
    os.environ["DERMAOPS_S3_ENDPOINT_URL"] = server.url
    from dermaops.store import ArtifactStore

    ArtifactStore().ensure_bucket(args.bucket)
    if args.env_file:
        tmp = args.env_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**server.env, "DERMAOPS_BUCKET": args.bucket}))
        tmp.replace(args.env_file)
    print(f"embedded S3 listening on {server.url}, bucket s3://{args.bucket}", file=sys.stderr, flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
