"""A Slack Web API server on loopback: just enough of `chat.postMessage` to test notify for real.

It checks the bearer token like Slack does, records every request, and has failure modes:

- "ok": answers like Slack ({"ok": true, "channel", "ts", "message"});
- "ratelimited": the FIRST call gets HTTP 429 with `Retry-After: 1`, later calls succeed;
- "channel_not_found": {"ok": false, "error": "channel_not_found"} (HTTP 200, as Slack does).
A wrong token always gets {"ok": false, "error": "invalid_auth"}.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

TOKEN = "xoxb-dermaops-test-token"
CHANNEL = "C0DERMAOPS"
MODES = ("ok", "ratelimited", "channel_not_found")


@dataclass
class SlackRequest:
    method: str  # Web API method, e.g. "chat.postMessage"
    authorization: str
    body: dict
    at: float
    accepted: bool = False


@dataclass
class SlackApiServer:
    mode: str = "ok"
    # Loopback by default; the deployment test binds the Docker bridge's address, which the stage
    # containers reach and nothing outside this host does.
    host: str = "127.0.0.1"
    requests: list[SlackRequest] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/api/"

    def env(self, token: str = TOKEN, channel: str = CHANNEL) -> dict[str, str]:
        """The environment a stage needs to post here."""
        return {"SLACK_BOT_TOKEN": token, "DERMAOPS_SLACK_CHANNEL": channel, "DERMAOPS_SLACK_API_URL": self.url}

    @property
    def messages(self) -> list[dict]:
        """Bodies of the chat.postMessage calls that were accepted."""
        return [r.body for r in self.requests if r.method == "chat.postMessage" and r.accepted]

    def start(self) -> SlackApiServer:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    body = json.loads(raw or "{}")
                else:
                    body = {k: v[0] for k, v in urllib.parse.parse_qs(raw).items()}
                    if isinstance(body.get("blocks"), str):
                        body["blocks"] = json.loads(body["blocks"])
                method = self.path.rsplit("/", 1)[-1]
                request = SlackRequest(method, self.headers.get("Authorization", ""), body, time.monotonic())
                api.requests.append(request)
                status, headers, reply = api.answer(request)
                payload = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json; charset=utf-8"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def answer(self, request: SlackRequest) -> tuple[int, dict, dict]:
        if request.method != "chat.postMessage":
            return 404, {}, {"ok": False, "error": "unknown_method"}
        if request.authorization != f"Bearer {TOKEN}":
            return 200, {}, {"ok": False, "error": "invalid_auth"}
        if self.mode == "ratelimited" and len(self.requests) == 1:
            return 429, {"Retry-After": "1"}, {"ok": False, "error": "ratelimited"}
        if self.mode == "channel_not_found":
            return 200, {}, {"ok": False, "error": "channel_not_found"}
        request.accepted = True
        ts = f"{time.time():.6f}"
        message = {"type": "message", "text": request.body.get("text"), "blocks": request.body.get("blocks"), "ts": ts}
        return 200, {}, {"ok": True, "channel": request.body.get("channel"), "ts": ts, "message": message}


def block_text(blocks: list[dict]) -> str:
    """All text of a Block Kit message, flattened."""
    parts = []
    for block in blocks:
        if "text" in block:
            parts.append(block["text"]["text"])
        parts += [f["text"] for f in block.get("fields", [])]
        parts += [e["text"] for e in block.get("elements", [])]
    return "\n".join(parts)


@pytest.fixture
def slack_api():
    server = SlackApiServer().start()
    yield server
    server.stop()
