"""The champion/challenger gate: the pure decision rule, then real registries on the loopback S3 with
real checkpoints re-scored on the real test split (small_models: fitted, weak = always nv,
blind = never mel)."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from dermaops.dataset import Dataset
from dermaops.promotion import Challenger, Registry, decide, run_gate
from dermaops.stage import Context
from dermaops.stages.evaluate import SplitScorer
from dermaops.store import S3Uri, sha256_bytes


def _metrics(macro_f1: float, mel_recall: float) -> dict:
    return {"macro_f1": macro_f1, "per_class": {"mel": {"recall": mel_recall}}}


def test_decision_rule():
    first = decide(_metrics(0.4, 0.6), None, "macro_f1", 0.005, 0.5)
    assert first.promoted and "no champion yet" in first.reason

    below = decide(_metrics(0.9, 0.49), None, "macro_f1", 0.005, 0.5)
    assert not below.promoted and "melanoma recall 0.4900 is below the floor 0.5000" in below.reason

    # Beating the champion does not excuse a melanoma recall under the floor.
    assert not decide(_metrics(0.9, 0.3), _metrics(0.2, 0.9), "macro_f1", 0.0, 0.5).promoted

    within = decide(_metrics(0.604, 0.6), _metrics(0.600, 0.6), "macro_f1", 0.005, 0.5)
    assert not within.promoted and "margin 0.0050" in within.reason and "+0.0040" in within.reason

    beats = decide(_metrics(0.62, 0.6), _metrics(0.60, 0.6), "macro_f1", 0.005, 0.5)
    assert beats.promoted and "beats the champion's 0.6000" in beats.reason

    # "Beats" is strict: an equal score with no margin keeps the champion.
    assert not decide(_metrics(0.6, 0.6), _metrics(0.6, 0.6), "macro_f1", 0.0, 0.5).promoted


@pytest.fixture(scope="module")
def scored(small_split, small_models, tmp_path_factory):
    """Each small model's checkpoint (local) and its metrics on the test split, plus the scorer."""
    from dermaops.store import ArtifactStore

    store = ArtifactStore()
    scratch = tmp_path_factory.mktemp("promotion")
    split = S3Uri.parse(small_split["split_uri"])
    test = pd.read_csv(io.BytesIO(store.get_bytes(split.join("test.csv"))))
    dataset = Dataset.open(store, small_split["dataset_uri"], scratch)
    scorer = SplitScorer(Context(store, scratch), dataset, test, 256, "cpu")
    models = {}
    for name, prefix in small_models.items():
        path = store.download(S3Uri.parse(prefix).join("cnn.pt"), scratch / name / "cnn.pt")
        _, meta, proba = scorer.score_checkpoint(path, name)
        models[name] = (path, meta, scorer.metrics(proba), f"{prefix}/cnn.pt")
    return {"scorer": scorer, "models": models, "dataset_version": dataset.version, "split": str(split)}


def _gate(registry: Registry, scored: dict, name: str, run_id: str, tmp_path, margin=0.005, floor=0.0) -> dict:
    path, meta, metrics, source = scored["models"][name]
    challenger = Challenger(run_id, path, source, metrics, meta, scored["dataset_version"], scored["split"])
    return run_gate(registry, challenger, scored["scorer"].score_champion, "macro_f1", margin, floor, tmp_path / run_id)


def test_gate_promotes_refuses_and_keeps_every_decision(scored, store, bucket, tmp_path):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    weak, fitted = scored["models"]["weak"][2], scored["models"]["fitted"][2]
    assert fitted["macro_f1"] > weak["macro_f1"] + 0.005

    first = _gate(registry, scored, "weak", "run-1", tmp_path)
    assert first["decision"] == "promoted" and "no champion yet" in first["reason"]
    weak_record = store.get_json(registry.champion_uri)
    assert weak_record["run_id"] == "run-1" and weak_record["decision"] == "promoted"

    blind = _gate(registry, scored, "blind", "run-2", tmp_path, floor=0.5)
    assert blind["decision"] == "refused" and "melanoma recall 0.0000 is below the floor 0.5000" in blind["reason"]

    close = _gate(registry, scored, "fitted", "run-3", tmp_path, margin=1.0)
    assert close["decision"] == "refused" and "by more than the margin 1.0000" in close["reason"]
    # The champion was re-scored on this test split, giving exactly its own metrics there.
    assert close["champion_before"]["run_id"] == "run-1"
    assert close["champion_before"]["rescored"]["macro_f1"] == pytest.approx(weak["macro_f1"])
    assert store.get_json(registry.champion_uri) == weak_record

    better = _gate(registry, scored, "fitted", "run-4", tmp_path)
    assert better["decision"] == "promoted" and "beats the champion's" in better["reason"]
    champion = store.get_json(registry.champion_uri)
    assert champion["run_id"] == "run-4" and champion["previous_champion"]["run_id"] == "run-1"
    assert champion["metrics"]["macro_f1"] == pytest.approx(fitted["macro_f1"])

    history = registry.history()
    assert [(h["run_id"], h["decision"]) for h in history] == [
        ("run-1", "promoted"),
        ("run-2", "refused"),
        ("run-3", "refused"),
        ("run-4", "promoted"),
    ]
    assert all(h["reason"] and h["primary_metric"] == "macro_f1" for h in history)
    # Both promoted checkpoints stay in the registry, immutable, under their content hash.
    stored = sorted(uri.key for uri, _ in store.list(registry.uri.join("models")))
    checkpoints = [key for key in stored if key.endswith("/cnn.pt")]
    assert len(checkpoints) == 2 and checkpoints[0].startswith(f"{registry.uri.key}/models/run-1-")
    # Each beside its model card (dermaops.model_card), and nothing else.
    cards = {key.rsplit("/", 1)[0] + "/" + name for key in checkpoints for name in ("model_card.json", "model_card.md")}
    assert set(stored) == set(checkpoints) | cards
    assert store.exists(weak_record["model_uri"])


def test_missing_or_corrupt_champion_is_treated_as_no_champion(scored, store, bucket, tmp_path):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "fitted", "run-1", tmp_path)
    store.delete(store.get_json(registry.champion_uri)["model_uri"])

    # The champion's checkpoint is gone: the weak model, worse than it, is judged as a first model.
    missing = _gate(registry, scored, "weak", "run-2", tmp_path)
    assert missing["decision"] == "promoted"
    assert "checkpoint is missing" in missing["reason"] and "treated as no champion" in missing["reason"]
    assert "checkpoint is missing" in missing["champion_before"]["problem"]

    # A checkpoint whose bytes differ from the recorded sha256 is corrupt.
    store.put_bytes(store.get_json(registry.champion_uri)["model_uri"], b"not a checkpoint")
    corrupt = _gate(registry, scored, "fitted", "run-3", tmp_path)
    assert corrupt["decision"] == "promoted" and "is corrupt" in corrupt["reason"]

    # An unreadable champion.json: same rule, the reason names it.
    store.put_bytes(registry.champion_uri, b"{ not json")
    unreadable = _gate(registry, scored, "weak", "run-4", tmp_path)
    assert unreadable["decision"] == "promoted" and "champion.json is unreadable" in unreadable["reason"]
    assert "treated as no champion" in unreadable["reason"]
    assert store.get_json(registry.champion_uri)["run_id"] == "run-4"
    assert [h["run_id"] for h in registry.history()] == ["run-1", "run-2", "run-3", "run-4"]


def test_evaluate_cli_refuses_a_worse_challenger(small_split, small_models, scored, run_stage, store, bucket, tmp_path):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "fitted", "run-1", tmp_path)
    champion = store.get_json(registry.champion_uri)

    result = run_stage(
        "evaluate",
        "--split",
        small_split["split_uri"],
        "--model",
        small_models["weak"],
        "--out",
        f"s3://{bucket.bucket}/runs/run-2/evaluation",
        "--registry",
        str(registry.uri),
        "--mel-recall-floor",
        "0",
        "--gradcam-images",
        "2",
    )
    summary = result.summary
    assert summary["status"] == "done" and summary["promoted"] is False and summary["decision"] == "refused"
    assert "does not beat the champion's" in summary["promotion_reason"]
    assert summary["champion_uri"] == champion["model_uri"]
    assert store.get_json(registry.champion_uri) == champion
    history = registry.history()
    assert [h["decision"] for h in history] == ["promoted", "refused"]
    weak_sha = sha256_bytes(store.get_bytes(S3Uri.parse(small_models["weak"]).join("cnn.pt")))
    assert history[-1]["challenger"]["model_sha256"] == weak_sha
