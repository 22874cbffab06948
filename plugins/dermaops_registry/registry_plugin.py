"""Airflow plugin: the model registry view (FastAPI app on the api-server + an entry in the UI's navigation).

The external view's `url_route` makes the UI embed the app in an iframe at /plugin/dermaops-registry,
under the Browse menu; `href` has no leading slash so it resolves against the api-server's base URL
(also behind a reverse proxy with a path prefix).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from dermaops_registry.registry_app import URL_PREFIX, app


class DermaOpsRegistryPlugin(AirflowPlugin):
    name = "dermaops_registry"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "DermaOps model registry"}]
    external_views = [
        {
            "name": "Model registry",
            "href": URL_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "category": "browse",
            "url_route": "dermaops-registry",
        }
    ]
