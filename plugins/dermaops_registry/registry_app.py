"""The registry view's FastAPI app, mounted by the api-server at URL_PREFIX.

Every route needs the Airflow UI login and read access to the retraining DAG: the dependency is
Airflow's own `requires_access_dag("GET", param_dag_id=...)`, which resolves the user from the
`Authorization: Bearer` header or the UI's `_token` session cookie (the iframe the UI embeds the
view in sends it) and asks the configured auth manager. Anonymous requests get 401, a user who may
not read the DAG gets 403, before any S3 read.

S3 is read with the `reader` role's key (dermaops.access: it may read, never write), from the connection
`dermaops_s3_reader`; without it, the connection `dermaops_s3` (one key for everything), else the
api-server's AWS_* / DERMAOPS_S3_ENDPOINT_URL environment.
"""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response

URL_PREFIX = "/dermaops-registry"
DAG_ID = "dermaops_ham10000"


def registry_uri():
    from dermaops.store import S3Uri

    return S3Uri(os.environ.get("DERMAOPS_BUCKET", "dermaops"), "registry/ham10000")


def _connection():
    """The reader role's connection, else the shared `dermaops_s3`, else None."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection
    from dermaops import access

    for conn_id in (access.conn_id("reader"), "dermaops_s3"):
        try:
            return Connection.get_connection_from_secrets(conn_id)
        except AirflowNotFoundException:
            continue
    return None


def _store():
    """An ArtifactStore with the reader's credentials (see the module's docstring)."""
    from dermaops.store import ArtifactStore

    conn = _connection()
    if conn is None:
        return ArtifactStore()
    import boto3
    from botocore.config import Config

    extra = conn.extra_dejson
    endpoint = extra.get("endpoint_url") or None
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=conn.login or None,
        aws_secret_access_key=conn.password or None,
        region_name=extra.get("region_name") or "us-east-1",
        config=Config(s3={"addressing_style": "path" if endpoint else "auto"}, retries={"mode": "standard"}),
    )
    return ArtifactStore(client)


def _can_read_dag():
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", param_dag_id=DAG_ID)


def _snapshot():
    from dermaops.errors import StageError
    from dermaops.registry_view import read_registry

    try:
        return read_registry(_store(), registry_uri())
    except StageError as exc:
        raise HTTPException(status_code=502, detail=f"cannot read the registry: {exc}") from exc


def _trends(monitoring: bool = True):
    """(every judged version with its figures, every prediction batch's monitoring record), oldest first."""
    from dermaops.errors import StageError
    from dermaops.monitoring import read_all
    from dermaops.promotion import Registry
    from dermaops.registry_trends import versions

    store, uri = _store(), registry_uri()
    try:
        found = versions(store, Registry(store, uri).history())
        return found, read_all(store, uri) if monitoring else []
    except StageError as exc:
        raise HTTPException(status_code=502, detail=f"cannot read the registry: {exc}") from exc


def create_app() -> FastAPI:
    app = FastAPI(
        title="DermaOps model registry",
        description="The HAM10000 champion, its decision history, evaluation report and plots, read from S3.",
        dependencies=[Depends(_can_read_dag())],
    )

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        from dermaops.registry_view import render_page

        return render_page(_snapshot())

    @app.get("/model-card", response_class=HTMLResponse)
    def model_card() -> str:
        from dermaops.registry_view import render_card_page

        snap = _snapshot()
        if snap.model_card_md is None:
            raise HTTPException(status_code=404, detail="the champion has no model card")
        return render_card_page(snap)

    @app.get("/api/registry")
    def registry_json() -> dict:
        return _snapshot().as_json()

    @app.get("/trends", response_class=HTMLResponse)
    def trends() -> str:
        from dermaops.registry_trends import render_trends
        from dermaops.registry_view import STYLE

        found, records = _trends()
        return render_trends(found, records, STYLE)

    @app.get("/api/trends")
    def trends_json() -> dict:
        found, records = _trends()
        return {
            "versions": [
                {"run_id": v.run_id, "decided_at": v.decided_at, "decision": v.decision, **v.figures} for v in found
            ],
            "monitoring": records,
        }

    @app.get("/compare", response_class=HTMLResponse)
    def compare(a: str | None = None, b: str | None = None) -> str:
        from dermaops.errors import StageError
        from dermaops.registry_trends import pick, render_compare
        from dermaops.registry_view import STYLE

        found, _ = _trends(monitoring=False)
        try:
            first, second = pick(found, a), pick(found, b)
        except StageError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        if first is None and second is None and len(found) >= 2:  # default: the two latest versions
            first, second = found[-2], found[-1]
        return render_compare(found, first, second, STYLE)

    @app.get("/artifacts/{name}")
    def artifact(name: str) -> Response:
        from dermaops.errors import StageError
        from dermaops.registry_view import evaluation_image

        try:
            data = evaluation_image(_store(), registry_uri(), name)
        except StageError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    return app


app = create_app()
