"""The model registry view in the Airflow UI: the plugin's FastAPI app served by a real `airflow
api-server` on loopback, reading a real registry (a model promoted by the real evaluate stage) from
the loopback S3. Anonymous requests are refused; a logged-in user (the UI's `_token` cookie, or a
bearer token) sees the champion, the decision history, the rendered run report and the plots."""

from __future__ import annotations

import secrets
import subprocess

import pytest
import requests
from dermaops.registry_view import RegistrySnapshot, render_markdown, render_page
from dermaops.store import S3Uri

from tests.support.airflow_env import AIRFLOW, api_server_env
from tests.test_airflow_api import Services, wait_for

USER, PASSWORD = "reviewer", "registry-" + secrets.token_hex(4)
VIEW = "/dermaops-registry"
PNG = b"\x89PNG\r\n\x1a\n"


def test_stored_text_cannot_inject_markup():
    """Registry contents come from runs, not from the viewer: every value is escaped, raw HTML in
    markdown is not passed through."""
    evil = "<script>alert(1)</script>"
    champion = {"run_id": evil, "model_uri": "s3://b/registry/m/cnn.pt", "reason": evil, "metrics": {}}
    history = [{"run_id": evil, "decision": "refused", "reason": evil, "decided_at": "2026-01-01"}]
    page = render_page(RegistrySnapshot(S3Uri("b", "registry"), champion, "", history, report_md=evil))
    assert "<script>" not in page and page.count("&lt;script&gt;") == 5
    html = render_markdown("| a |\n|---|\n| 1 |\n\n![cm](confusion_matrix.png) ![x](http://e/x.png)", "artifacts/")
    assert "<table>" in html and 'src="artifacts/confusion_matrix.png"' in html and 'src="http://e/x.png"' in html


def test_the_champion_section_shows_the_melanoma_operating_point():
    """From champion.json's operating_point (dermaops.promotion.operating_point_record): the rule, the test
    figures with their intervals and the validation figures; "argmax" only when no threshold is stored."""
    champion = {
        "run_id": "r1",
        "model_uri": "s3://b/registry/m/cnn.pt",
        "mel_threshold": 0.3125,
        "operating_point": {
            "threshold": 0.3125,
            "target_sensitivity": 0.85,
            "validation": {"sensitivity": 0.8571, "specificity": 0.6104},
            "test": {"sensitivity": 0.8, "sensitivity_ci": [0.7, 0.9], "specificity": 0.64,
                     "specificity_ci": [0.6, 0.68], "n_mel": 110, "n_other": 890},
        },
    }  # fmt: skip
    page = render_page(RegistrySnapshot(S3Uri("b", "registry"), champion, ""))
    assert (
        "Melanoma operating point p(mel) &gt;= 0.312 (chosen on validation for sensitivity 0.85): test sensitivity "
        "0.80 [0.70, 0.90], specificity 0.64 [0.60, 0.68] (95 % intervals); validation sensitivity 0.86, "
        "specificity 0.61" in page
    )
    assert "argmax" not in page
    older = {k: v for k, v in champion.items() if k != "operating_point"}  # promoted before issue 22
    assert "p(mel) &gt;= 0.312" in render_page(RegistrySnapshot(S3Uri("b", "registry"), older, ""))
    del older["mel_threshold"]
    assert "argmax (no stored threshold)" in render_page(RegistrySnapshot(S3Uri("b", "registry"), older, ""))


@pytest.fixture
def api_server(tmp_path, s3_server, promoted_registry):
    home = tmp_path / "airflow"
    home.mkdir()
    env, port = api_server_env(home, USER, PASSWORD, "viewer")
    env.update({**s3_server.env, "DERMAOPS_BUCKET": promoted_registry["bucket"]})
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    services = Services(env, home)
    services.start("api-server", "api-server")
    try:
        yield f"http://127.0.0.1:{port}", services
    finally:
        services.stop()


def _token(base: str) -> str | None:
    try:
        response = requests.post(f"{base}/auth/token", json={"username": USER, "password": PASSWORD}, timeout=5)
    except requests.ConnectionError:
        return None
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


@pytest.mark.slow
def test_registry_view_needs_the_login_and_shows_the_registry(api_server, promoted_registry, store):
    base, services = api_server
    token = wait_for("the API server", lambda: _token(base), services, timeout=240)

    # No login, no view: every route, before anything is read from S3.
    for route in ("/", "/api/registry", "/artifacts/confusion_matrix.png", "/model-card"):
        assert requests.get(f"{base}{VIEW}{route}", timeout=30).status_code == 401, route
    forged = requests.get(f"{base}{VIEW}/", cookies={"_token": "not-a-jwt"}, timeout=30)
    assert forged.status_code in (401, 403)

    # The UI's session cookie (what the embedded iframe sends) is the login.
    browser = requests.Session()
    browser.cookies.set("_token", token)
    page = browser.get(f"{base}{VIEW}/", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    champion = promoted_registry["champion"]
    text = page.text
    assert "HAM10000 model registry" in text and champion["run_id"] in text and champion["model_sha256"] in text
    assert f"{champion['metrics']['macro_f1']:.4f}" in text
    # The operating point the evaluate stage wrote into champion.json, not "argmax".
    assert champion["operating_point"]["threshold"] == champion["mel_threshold"] is not None
    assert f"Melanoma operating point p(mel) &gt;= {champion['mel_threshold']:.3f}" in text
    assert "Decision history" in text and "no champion yet" in text  # the first promotion's reason
    # The champion run's report.md, rendered (its heading and its markdown tables as HTML).
    assert f"<h1>DermaOps evaluation: run <code>{champion['run_id']}</code></h1>" in text
    assert "<table>" in text.split("Run report", 1)[1]
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "gradcam_mel.png"):
        assert f'src="artifacts/{name}"' in text
    assert '<a href="model-card">Model card</a>' in text

    evaluation = S3Uri.parse(promoted_registry["evaluation"])
    image = browser.get(f"{base}{VIEW}/artifacts/confusion_matrix.png", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(PNG) and image.content == store.get_bytes(evaluation.join("confusion_matrix.png"))
    assert browser.get(f"{base}{VIEW}/artifacts/metrics.json", timeout=30).status_code == 404  # only the plots

    card = browser.get(f"{base}{VIEW}/model-card", timeout=30)
    assert card.status_code == 200 and "Not for diagnosis without a clinician" in card.text

    # A bearer token works the same (scripts, the REST API's way).
    api = requests.get(f"{base}{VIEW}/api/registry", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert api.status_code == 200
    snapshot = api.json()
    assert snapshot["champion"]["run_id"] == champion["run_id"]
    assert [h["decision"] for h in snapshot["history"]] == ["promoted"]
    assert snapshot["evaluation_uri"] == str(evaluation) and snapshot["has_report"] and snapshot["has_model_card"]

    # The UI's navigation lists the view (external view embedded at /plugin/dermaops-registry).
    plugins = requests.get(f"{base}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert plugins.status_code == 200, plugins.text
    [plugin] = [p for p in plugins.json()["plugins"] if p["name"] == "dermaops_registry"]
    [view] = plugin["external_views"]
    assert (view["href"], view["url_route"], view["destination"]) == ("dermaops-registry/", "dermaops-registry", "nav")
    assert plugin["fastapi_apps"][0]["url_prefix"] == VIEW
