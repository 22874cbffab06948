"""Container healthchecks for the Airflow services of docker-compose.yaml, without importing Airflow.

    python /opt/airflow/healthcheck.py http URL
    python /opt/airflow/healthcheck.py job DagProcessorJob|TriggererJob
    python /opt/airflow/healthcheck.py celery

The official compose file probes with `airflow jobs check` and `celery --app <airflow's app> inspect
ping`. Each of those imports Airflow, about 10 CPU-seconds per probe: four services probing every 30 s
kept more than one core of a 2-core host busy and starved the tasks themselves (a CPU-bound evaluate
ran past its heartbeat timeout). These probes check the same facts for well under a CPU-second:

- job: the newest `running` row of that job type for this container's hostname in the metadata
  database heartbeated within DERMAOPS_HEALTH_JOB_STALE_S (default 120 s; `airflow jobs check` uses
  the job's own heart rate, too tight for a loaded host);
- celery: this worker's node (celery@$HOSTNAME) answers a broadcast ping through the broker, with a
  bare Celery app;
- http: the URL answers 2xx.

Exit 0 healthy, 1 not (the reason on one line).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def http(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return f"{url} answered {response.status}"


def job(job_type: str) -> str:
    import psycopg2

    # The same database Airflow uses; the SQLAlchemy URL names its driver, psycopg2 takes a libpq URL.
    url = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://", 1)
    stale_s = float(os.environ.get("DERMAOPS_HEALTH_JOB_STALE_S", "120"))
    hostname = os.environ.get("HOSTNAME", "")
    with psycopg2.connect(url, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT EXTRACT(EPOCH FROM (now() - max(latest_heartbeat))) FROM job "
            "WHERE job_type = %s AND state = 'running' AND hostname = %s",
            (job_type, hostname),
        )
        (age,) = cur.fetchone()
    if age is None:
        raise RuntimeError(f"no running {job_type} of host {hostname} in the job table")
    if age > stale_s:
        raise RuntimeError(f"{job_type} of host {hostname} last heartbeat {age:.0f} s ago (> {stale_s:.0f} s)")
    return f"{job_type} of host {hostname} heartbeat {age:.0f} s ago"


def celery() -> str:
    from celery import Celery

    node = f"celery@{os.environ.get('HOSTNAME', '')}"
    app = Celery(broker=os.environ["AIRFLOW__CELERY__BROKER_URL"])
    replies = app.control.ping(destination=[node], timeout=15)
    if not any(node in reply for reply in replies):
        raise RuntimeError(f"{node} did not answer a ping through the broker")
    return f"{node} answered"


def main(argv: list[str]) -> int:
    probes = {"http": http, "job": job, "celery": celery}
    if not argv or argv[0] not in probes:
        print(f"usage: healthcheck.py {{{'|'.join(probes)}}} [ARG]", file=sys.stderr)
        return 2
    try:
        print(probes[argv[0]](*argv[1:]))
    except Exception as exc:  # any failure means unhealthy; say why in one line
        print(f"unhealthy: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
