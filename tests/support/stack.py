"""The compose deployment as a user runs it (scripts/stack), and a headless Chromium to drive its UI.

- `Stack`: `scripts/stack up|down` with its own env file, project, network and loopback ports, so it
  never meets a developer's own stack; `compose(...)` runs `docker compose` on it, `api` is a REST
  session with the UI login of the env file `scripts/stack` generated.
- `chromium(artifacts)`: Debian's chromium + chromium-driver through selenium (installed with apt-get
  when missing, as CI must on a fresh machine), headless, with a fresh profile.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from dermaops.embedded_s3 import free_port

from tests.support.docker_engine import ROOT

STACK = str(ROOT / "scripts" / "stack")
CHROMIUM_PACKAGES = ("chromium", "chromium-driver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
)


def docker_bridge_gateway() -> str:
    """The host's address on Docker's default bridge: every container on this engine reaches it
    (host-gateway), nothing off this host does. The Slack stand-in listens there."""
    out = subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", "{{json (index .IPAM.Config 0)}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    ipam = json.loads(out.stdout)
    # A freshly started engine may list only the subnet: its gateway is then the subnet's first host
    # (what dockerd gives docker0). An empty host would make the stand-in listen on every interface.
    if ipam.get("Gateway"):
        return ipam["Gateway"]
    if ipam.get("Subnet"):
        return str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))
    raise AssertionError(f"Docker's bridge network has neither a gateway nor a subnet: {out.stdout.strip()}")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            env[name] = value
    return env


@dataclass
class Stack:
    workdir: Path
    project: str = "dermaops-e2e"
    settings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.env_file = self.workdir / ".env"
        self.ui_port = free_port()
        self.s3_port = free_port()
        self.settings = {
            "DERMAOPS_ENV_FILE": str(self.env_file),
            "DERMAOPS_STACK_PROJECT": self.project,
            "DERMAOPS_DOCKER_NETWORK": self.project,
            "DERMAOPS_UI_PORT": str(self.ui_port),
            "MINIO_PORT": str(self.s3_port),
            "MINIO_CONSOLE_PORT": str(free_port()),
            **self.settings,
        }

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.settings}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def secrets(self) -> dict[str, str]:
        return read_env_file(self.env_file)

    def run(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        proc = subprocess.run([STACK, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"scripts/stack {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        return proc

    @property
    def is_up(self) -> bool:
        """scripts/stack up leaves this marker (whether it added the offline file); down removes it."""
        return (ROOT / ".dermaops" / f"stack-offline-{self.project}").exists()

    def save_logs(self, path: Path) -> Path:
        """Every service's log, kept before `down -v` removes the containers."""
        path.write_text(self.compose("logs", "--no-color", "--timestamps", timeout=120).stdout)
        return path

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        offline = (ROOT / ".dermaops" / f"stack-offline-{self.project}").read_text().strip() == "1"
        files = ["-f", str(ROOT / "docker-compose.yaml")]
        if offline:
            files += ["-f", str(ROOT / "docker-compose.offline.yaml")]
        cmd = ["docker", "compose", "-p", self.project, "--project-directory", str(ROOT)]
        cmd += ["--env-file", str(self.env_file), *files, "--profile", "gpu-worker", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc

    def container_hostnames(self, service: str) -> set[str]:
        ids = self.compose("ps", "-q", service).stdout.split()
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{.Config.Hostname}}", *ids], capture_output=True, text=True, check=True
        )
        return set(out.stdout.split())

    def api(self) -> requests.Session:
        env = self.secrets
        response = requests.post(
            f"{self.url}/auth/token",
            json={"username": env["_AIRFLOW_WWW_USER_USERNAME"], "password": env["_AIRFLOW_WWW_USER_PASSWORD"]},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return session


def ensure_chromium() -> tuple[str, str]:
    """(chromium binary, chromedriver binary), installing Debian's packages when missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *CHROMIUM_PACKAGES],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"apt-get install {' '.join(CHROMIUM_PACKAGES)} failed:\n{proc.stderr[-3000:]}"
    return shutil.which("chromium"), shutil.which("chromedriver")


def chromium(profile_dir: Path):
    """A headless Chromium under selenium with a fresh profile in profile_dir."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    browser.set_page_load_timeout(60)
    return browser


def wait_for(what: str, check, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (requests.RequestException, ValueError) as exc:  # the API restarting, a half-written answer
            result, last = None, exc
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")
