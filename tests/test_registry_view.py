"""The model registry view in the Airflow UI: the plugin's FastAPI app served by a real `airflow
api-server` on loopback, reading a real registry (a model promoted by the real evaluate stage) from
the loopback S3. Anonymous requests are refused; a logged-in user (the UI's `_token` cookie, or a
bearer token) sees the champion, the decision history, the rendered run report and the plots."""

from __future__ import annotations

import secrets
import subprocess

import pytest
import requests
from dermaops.dataset import CLASSES
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


def test_trend_and_comparison_pages_escape_stored_text_and_draw_the_charts():
    """Run ids, decisions and alerts come from runs: escaped in the tables, drawn as paths in the SVG charts."""
    from dermaops.registry_trends import Version, figures_of, render_compare, render_trends
    from dermaops.registry_view import STYLE

    evil = "<script>alert(1)</script>"
    versions = []
    for i, decision in enumerate(("promoted", "refused")):
        entry = {"run_id": f"{evil}{i}", "decided_at": f"2026-01-0{i + 1}T00:00:00", "decision": decision,
                 "challenger": {"metrics": {"macro_f1": 0.4 + i / 10, "balanced_accuracy": 0.5, "mel_recall": 0.6}},
                 "recipe": {"epochs": i, "lr": 0.003}, "dataset_version": evil}  # fmt: skip
        version = Version(entry["run_id"], entry["decided_at"], decision, entry)
        version.figures = figures_of(entry, None, {"max_psi": 0.1 * i})
        versions.append(version)
    record = {"created_at": "2026-01-05T00:00:00", "run": evil, "classes": list(CLASSES), "n_images": 9,
              "class_mix": {c: 1 / 7 for c in CLASSES}, "train_prior": None, "class_mix_shift": None,
              "referral_rate": 0.1, "ood_rate": 0.4, "bounds": {"ood_rate": 0.2, "class_mix_shift": 0.3},
              "alerts": [evil]}  # fmt: skip
    trends = render_trends(versions, [record], STYLE)
    # Escaped in the tables (and in the comments matplotlib writes beside each text path).
    assert "<script>" not in trends and trends.count("<svg") == 2 and "<td>&lt;script&gt;alert(1)" in trends
    assert versions[1].figures == {"macro_f1": 0.5, "balanced_accuracy": 0.5, "mel_sensitivity": 0.6, "ece": None,
                                   "drift": 0.1}  # fmt: skip
    compare = render_compare(versions, versions[0], versions[1], STYLE)
    assert "<script>" not in compare and "<th>epochs</th><td>0</td><td>1</td>" in compare
    assert "lr" not in compare.split("Recipe settings that differ")[1].split("</table>")[0]  # equal: not listed
    assert "No evaluation metrics (the run folder is gone)" in compare


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


def viewer_api_server(tmp_path, s3_server, bucket: str):
    """Airflow's API server with the registry view, a viewer logged in, reading `bucket`: (base URL, services)."""
    home = tmp_path / "airflow"
    home.mkdir()
    env, port = api_server_env(home, USER, PASSWORD, "viewer")
    env.update({**s3_server.env, "DERMAOPS_BUCKET": bucket})
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    services = Services(env, home)
    services.start("api-server", "api-server")
    try:
        yield f"http://127.0.0.1:{port}", services
    finally:
        services.stop()


@pytest.fixture
def api_server(tmp_path, s3_server, promoted_registry):
    yield from viewer_api_server(tmp_path, s3_server, promoted_registry["bucket"])


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
    # The fixture's champion is the uncalibrated `fitted` model (tests/test_predict.py relies on that): it has no
    # melanoma threshold, and the page says so rather than showing one (the stored operating point's rendering:
    # test_the_champion_section_shows_the_melanoma_operating_point).
    assert champion["mel_threshold"] is None and champion["operating_point"] is None
    assert "argmax (no stored threshold)" in text
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


@pytest.fixture
def registry_with_history(small_split, small_models, guarded_model, pack_sample, s3_server, tmp_path_factory):
    """A fresh bucket whose registry judged three versions with the real evaluate stage (the DAG's run layout,
    so each run's evaluation folder is where the view looks): `fitted` promoted first, `weak` refused, `guarded`
    refused (it equals the champion's predictions: no gain) with subgroups, referral and out-of-distribution
    figures; and two prediction batches of the guarded model recorded for monitoring, the second with
    scikit-image's photographs in it (past the out-of-distribution bound)."""
    import json
    import os
    import sys
    import uuid

    from dermaops.store import ArtifactStore

    from tests.support.ood_images import photograph_jpegs
    from tests.support.registry import evaluate_and_promote, sample_jpegs

    name = f"trends-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore()
    store.ensure_bucket(name)
    scratch = tmp_path_factory.mktemp("trends")
    decisions = {}
    for run_id, model in (("run-1-fitted", "fitted"), ("run-2-weak", "weak"), ("run-3-guarded", "guarded")):
        source = S3Uri.parse(guarded_model if model == "guarded" else small_models[model])
        for uri, _ in store.list(source):
            store.put_bytes(S3Uri(name, f"runs/{run_id}/models/cnn/{uri.name}"), store.get_bytes(uri))
        summary = evaluate_and_promote(
            name, small_split, f"s3://{name}/runs/{run_id}/models/cnn", run_id, scratch / run_id
        )
        decisions[run_id] = summary["decision"]
    registry = f"s3://{name}/registry/ham10000"
    batch = scratch / "batch"
    sample_jpegs(pack_sample, batch, 30)
    photograph_jpegs(batch)
    env = {**os.environ, **s3_server.env, "DERMAOPS_SCRATCH_DIR": str(scratch / "predict")}
    # The first batch, genuine dermatoscopy, under a class-mix bound it cannot pass (the 70-image sample is not
    # drawn like the training split); the second under the defaults.
    for out, images, bounds in (
        ("sample", str(pack_sample), ["--max-class-mix-shift", "1"]),
        ("with-photographs", str(batch), []),
    ):
        argv = ["predict", "--model", guarded_model, "--images", images, "--registry", registry, "--no-tta", *bounds]
        proc = subprocess.run(
            [sys.executable, "-m", "dermaops", *argv, "--out", f"s3://{name}/predictions/{out}"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["monitoring"]["record_uri"]
    return {"bucket": name, "registry": registry, "decisions": decisions}


@pytest.fixture
def trends_server(tmp_path, s3_server, registry_with_history):
    yield from viewer_api_server(tmp_path, s3_server, registry_with_history["bucket"])


@pytest.mark.slow
def test_trends_and_comparison_pages_in_a_real_browser(trends_server, registry_with_history, tmp_path):
    """Headless Chromium logged in with the UI's session cookie: the trends page charts every judged version
    and the prediction batches, the comparison page puts two versions side by side. Screenshots are kept
    beside the test (printed with -s)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.support.stack import chromium

    base, services = trends_server
    token = wait_for("the API server", lambda: _token(base), services, timeout=240)
    assert requests.get(f"{base}{VIEW}/trends", timeout=30).status_code == 401  # no login, no trends
    assert requests.get(f"{base}{VIEW}/compare", timeout=30).status_code == 401
    api = requests.get(f"{base}{VIEW}/api/trends", headers={"Authorization": f"Bearer {token}"}, timeout=60).json()
    assert [v["run_id"] for v in api["versions"]] == ["run-1-fitted", "run-2-weak", "run-3-guarded"]
    assert [v["decision"] for v in api["versions"]] == list(registry_with_history["decisions"].values())
    assert all(v["macro_f1"] is not None and v["ece"] is not None for v in api["versions"])
    [calm, alerted] = api["monitoring"]
    assert calm["alerts"] == [] and alerted["alerts"] and alerted["ood_rate"] > alerted["bounds"]["ood_rate"]

    browser = chromium(tmp_path / "chromium-profile")
    shots = {}
    try:
        browser.get(f"{base}{VIEW}/api/registry")  # the origin, so that the session cookie can be set
        browser.add_cookie({"name": "_token", "value": token, "path": "/"})
        browser.set_window_size(1280, 900)
        browser.get(f"{base}{VIEW}/")
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.LINK_TEXT, "Compare two versions")))
        browser.find_element(By.PARTIAL_LINK_TEXT, "Trends across versions").click()
        WebDriverWait(browser, 120).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#trend-chart svg")))
        assert browser.find_element(By.CSS_SELECTOR, "#monitoring-chart svg").is_displayed()
        rows = browser.find_elements(By.CSS_SELECTOR, "#versions table tr")[1:]
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [v["run_id"] for v in api["versions"]]
        assert "out of distribution" in browser.find_element(By.ID, "monitoring").text
        shots["trends"] = _full_page(browser, tmp_path / "registry-trends.png")

        browser.find_element(By.LINK_TEXT, "Compare two versions").click()
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.NAME, "a")))
        Select(browser.find_element(By.NAME, "a")).select_by_value("run-1-fitted")
        Select(browser.find_element(By.NAME, "b")).select_by_value("run-3-guarded")
        browser.find_element(By.CSS_SELECTOR, "form button").click()
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.ID, "confusion")))
        assert "A: run-1-fitted · B: run-3-guarded" in browser.find_element(By.TAG_NAME, "h2").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#confusion table.confusion")) == 2
        assert len(browser.find_elements(By.CSS_SELECTOR, "#recall tr")) == 1 + len(CLASSES)
        subgroups = browser.find_element(By.ID, "subgroups").text
        assert "localization" in subgroups and "sex" in subgroups  # the guarded run's subgroup table
        assert "dataset_version" not in browser.find_element(By.ID, "data").text  # facts by name, not by key
        shots["compare"] = _full_page(browser, tmp_path / "registry-compare.png")
    finally:
        browser.quit()
    for what, path in shots.items():
        assert path.read_bytes().startswith(PNG)
        print(f"registry {what} screenshot: {path}")


def _full_page(browser, path):
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 40, 6000))
    browser.save_screenshot(str(path))
    browser.set_window_size(1280, 900)
    return path
