"""The model registry view in the Airflow UI: a FastAPI app served by the api-server, linked in the UI's
navigation as an external view (see registry_plugin.py)."""
