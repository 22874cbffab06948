"""The embedded default store: a real S3 endpoint on loopback, and a clear failure on a busy port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from dermaops.store import ArtifactStore


def test_serves_s3_and_writes_client_env(tmp_path, monkeypatch):
    env_file = tmp_path / "s3.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dermaops.embedded_s3", "--bucket", "demo", "--env-file", str(env_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "embedded S3 did not become ready in 60 s"
            time.sleep(0.1)
        env = json.loads(env_file.read_text())
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        store = ArtifactStore()
        store.put_bytes("s3://demo/a/b.txt", b"hello")
        assert store.get_bytes("s3://demo/a/b.txt") == b"hello"
        assert [str(u) for u, _ in store.list("s3://demo/a")] == ["s3://demo/a/b.txt"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_busy_port_fails_in_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "dermaops.embedded_s3", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"embedded S3: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
