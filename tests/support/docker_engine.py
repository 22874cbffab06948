"""A real Docker engine and the project's images, for the tests that run containers.

Nothing here skips: where no engine runs, scripts/docker-engine installs and starts one (as CI must
on a fresh machine), and a failure to do so fails the test with the script's message.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAMES = ("data", "torch", "airflow")
# Tests that use these fixtures need the engine and the project's images (and so run last).
DOCKER_FIXTURES = {"docker_engine", "build_images", "dermaops_images"}
PREBUILD_LOG = ROOT / ".dermaops" / "images" / "prebuild.log"
_prebuild: subprocess.Popen | None = None


def needs_docker(item: pytest.Item) -> bool:
    return item.get_closest_marker("docker") is not None or bool(
        DOCKER_FIXTURES & set(getattr(item, "fixturenames", ()))
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests that need Docker run after all the others, while scripts/build-images makes the images in
    the background. On a fresh machine the cold builds (about 25 minutes here, mostly disk and the
    loopback wheelhouse) then overlap the rest of the suite instead of adding to it. build-images holds
    a lock, so the first test that asks for an image waits for that build and then finds it up to date;
    a failed background build is simply rebuilt there, and fails that test with the script's message."""
    global _prebuild
    docker_items = [item for item in items if needs_docker(item)]
    if not docker_items or config.option.collectonly:
        return
    items[:] = [item for item in items if not needs_docker(item)] + docker_items
    PREBUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(PREBUILD_LOG, "w") as log:
        _prebuild = subprocess.Popen(
            [str(ROOT / "scripts" / "build-images"), "all"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"{len(docker_items)} Docker tests run last; the images build meanwhile (log: {PREBUILD_LOG})"
        )


def pytest_sessionfinish(session):
    # A run stopped early (-x, Ctrl-C) must not leave the build going.
    if _prebuild is not None and _prebuild.poll() is None:
        os.killpg(_prebuild.pid, signal.SIGTERM)
        _prebuild.wait(timeout=60)


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
