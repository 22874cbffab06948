"""Shared fixtures. Real servers on loopback, real data from ../shared/data.

Fixture modules live in tests/support/ and are all loaded as pytest plugins, so each area of the
suite can add its own servers (HTTP source, Slack API, Docker) without editing this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = sorted(
    f"tests.support.{p.stem}" for p in (ROOT / "tests" / "support").glob("*.py") if not p.stem.startswith("_")
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # In CI a skip hides a failure: under CI=true every skip is reported as a failure.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (CI must run every test): {report.longrepr}"


# The fast tier (`scripts/test -m "not slow"`) is the unit tests. A test that runs a stage as a process,
# ingests or splits the real data, trains, or starts Airflow or Docker is slow, by the fixtures it uses.
SLOW_FIXTURES = {
    "run_stage",
    "dataset_28px",
    "dataset_200px",
    "small_pack_200px",
    "dataset_sample",
    "small_split",
    "small_models",
    "guarded_model",
    "split_uri",
    "airflow_env",
    "docker_engine",
    "build_images",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
