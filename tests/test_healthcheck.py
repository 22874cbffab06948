"""images/healthcheck.py, the compose services' probes, run as the containers run them (a fresh
python process) against real servers on loopback: an HTTP server, and a TCP port with nothing
behind it standing in for an unreachable broker. The `job` probe needs psycopg2, which only the
Airflow image has: the deployment test's `scripts/stack up` waits on it for real."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dermaops.embedded_s3 import free_port

from tests.support.docker_engine import ROOT

PROBE = str(ROOT / "images" / "healthcheck.py")


def probe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, PROBE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin", **(env or {})},
    )


@pytest.fixture
def http_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_probe_passes_on_2xx_and_fails_in_one_line_otherwise(http_server):
    ok = probe("http", f"{http_server}/health")
    assert ok.returncode == 0, ok.stderr
    bad = probe("http", f"{http_server}/down")
    assert bad.returncode == 1
    assert bad.stderr.startswith("unhealthy: HTTPError") and "503" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_celery_probe_fails_when_the_broker_is_unreachable():
    broker = f"redis://127.0.0.1:{free_port()}/0"
    result = probe("celery", env={"AIRFLOW__CELERY__BROKER_URL": broker, "HOSTNAME": "t"})
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_probe_is_a_usage_error():
    result = probe("ping")
    assert result.returncode == 2 and "usage: healthcheck.py {http|job|celery}" in result.stderr
