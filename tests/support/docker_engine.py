"""A real Docker engine and the project's images, for the tests that run containers.

Nothing here skips: where no engine runs, scripts/docker-engine installs and starts one (as CI must
on a fresh machine), and a failure to do so fails the test with the script's message.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAMES = ("data", "torch", "airflow")


def docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`docker ARGS` -> CompletedProcess (text). check=True fails with the command's stderr."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """Ensure a Docker engine answers (installing/starting it when needed); returns its version."""
    run_script("docker-engine", timeout=600)
    return docker("version", "--format", "{{.Server.Version}}").stdout.strip()


@pytest.fixture(scope="session")
def build_images(docker_engine):
    """build_images("data", "torch") -> {"data": "dermaops-data:<version>", ...}.

    Builds through scripts/build-images, which skips images whose inputs did not change, so only the
    first call on a machine (or after a change) pays for a build. Cold: minutes (torch the most).
    """
    built: dict[str, str] = {}

    def build(*names: str) -> dict[str, str]:
        unknown = set(names) - set(IMAGE_NAMES)
        assert not unknown, f"unknown images {sorted(unknown)} (images: {IMAGE_NAMES})"
        wanted = [name for name in names if name not in built]
        if wanted:
            proc = run_script("build-images", *wanted, timeout=3600)
            tags = proc.stdout.split()
            assert len(tags) == len(wanted), f"build-images printed {tags} for {wanted}"
            built.update(zip(wanted, tags, strict=True))
        return {name: built[name] for name in names}

    return build
