"""The champion/challenger gate: the pure decision rule, then real registries on the loopback S3 with
real checkpoints re-scored on the real test split (small_models: fitted, weak = always nv,
blind = never mel). The gate fails closed: a champion that cannot be loaded is an incident."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from dermaops.checkpoint import CheckpointMeta
from dermaops.dataset import CLASSES, Dataset
from dermaops.errors import StageError
from dermaops.promotion import (
    Challenger,
    ChampionIncident,
    Floors,
    GatePolicy,
    Registry,
    decide,
    operating_point_record,
    run_gate,
)
from dermaops.scoring import SplitScorer
from dermaops.stage import Context
from dermaops.store import S3Uri, sha256_bytes

# The decision-rule tests isolate the melanoma floor and the champion: the other floors off, and a Random
# Forest that scored nothing.
MEL_ONLY = Floors(mel_recall=0.5, macro_f1=0.0, macro_auc=0.0, allow_subset=True)
RF_ZERO = {"macro_f1": 0.0}


def _metrics(macro_f1: float, mel_recall: float, macro_auc: float | None = 0.9) -> dict:
    return {"macro_f1": macro_f1, "macro_auc": macro_auc, "per_class": {"mel": {"recall": mel_recall}}}


def test_the_first_champion_must_clear_every_absolute_rule():
    """The issue's reproduction: accuracy 0.112, macro F1 0.029, AUC 0.46, nearly everything called
    melanoma (recall 0.9), trained on 300 images, was promoted as the first champion."""
    useless = _metrics(0.029, 0.9, macro_auc=0.46)
    floors = Floors(mel_recall=0.5, macro_f1=0.25, macro_auc=0.75)
    rf = {"macro_f1": 0.30}
    subset = "max_train_images=300: 300 of 7000 training images"

    on_subset = decide(useless, None, GatePolicy(margin=0.005, floors=floors), baseline=rf, subset=subset)
    assert not on_subset.promoted and "trained on a subset (max_train_images=300" in on_subset.reason
    low_f1 = decide(useless, None, GatePolicy(margin=0.005, floors=floors), baseline=rf)
    assert not low_f1.promoted and low_f1.reason == "macro_f1 0.0290 is below the absolute floor 0.2500"
    low_auc = decide(_metrics(0.4, 0.9, macro_auc=0.46), None, GatePolicy(margin=0.005, floors=floors), baseline=rf)
    assert not low_auc.promoted and low_auc.reason == "macro_auc 0.4600 is below the absolute floor 0.7500"
    no_auc = decide(_metrics(0.4, 0.9, macro_auc=None), None, GatePolicy(margin=0.005, floors=floors), baseline=rf)
    assert not no_auc.promoted and "macro_auc undefined" in no_auc.reason

    below_rf = decide(_metrics(0.29, 0.9), None, GatePolicy(margin=0.005, floors=floors), baseline=rf)
    assert not below_rf.promoted
    assert below_rf.reason == "macro_f1 0.2900 does not beat this run's Random Forest baseline (0.3000)"
    no_rf = decide(_metrics(0.4, 0.9), None, GatePolicy(margin=0.005, floors=floors), baseline=None)
    assert not no_rf.promoted and "no Random Forest baseline" in no_rf.reason

    good = decide(_metrics(0.4, 0.6), None, GatePolicy(margin=0.005, floors=floors), baseline=rf)
    assert good.promoted and "no champion yet" in good.reason and "beats this run's Random Forest" in good.reason
    # Explicitly allowed, a subset model is judged like any other.
    allowed = Floors(0.5, 0.25, 0.75, allow_subset=True)
    assert decide(
        _metrics(0.4, 0.6), None, GatePolicy(margin=0.005, floors=allowed), baseline=rf, subset=subset
    ).promoted
    # The rules hold against a champion too: beating a worse champion does not excuse losing to the RF.
    assert not decide(
        _metrics(0.29, 0.9), _metrics(0.1, 0.9), GatePolicy(margin=0.0, floors=floors), baseline=rf
    ).promoted


def test_the_champion_record_carries_the_melanoma_operating_point():
    """champion.json's operating_point: the threshold, what it was chosen for on validation, and the test
    figures evaluate measured; predict reads mel_threshold from the record (dermaops.prediction)."""
    argmax = CheckpointMeta.for_model("resnet18", CLASSES, 28, "auto", "none")
    meta = argmax.replace(
        mel_threshold=0.31,
        calibration={"mel_target_sensitivity": 0.85, "val_mel_sensitivity": 0.86, "val_mel_specificity": 0.61},
    )
    test = {"threshold": 0.31, "rule": "p(mel) >= 0.310", "sensitivity": 0.8, "sensitivity_ci": [0.7, 0.9],
            "specificity": 0.64, "specificity_ci": [0.6, 0.68], "n_mel": 110, "n_other": 890}  # fmt: skip
    assert operating_point_record(meta, {"mel_operating_point": test}) == {
        "threshold": 0.31,
        "target_sensitivity": 0.85,
        "validation": {"sensitivity": 0.86, "specificity": 0.61},
        "test": {k: test[k] for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "n_mel",
                                      "n_other")},
    }  # fmt: skip
    assert operating_point_record(argmax, {"mel_operating_point": test}) is None  # no threshold
    assert operating_point_record(meta, {})["test"] is None


def test_decision_rule():
    first = decide(_metrics(0.4, 0.6), None, GatePolicy(margin=0.005, floors=MEL_ONLY), baseline=RF_ZERO)
    assert first.promoted and "no champion yet" in first.reason

    below = decide(_metrics(0.9, 0.49), None, GatePolicy(margin=0.005, floors=MEL_ONLY), baseline=RF_ZERO)
    assert not below.promoted and "melanoma recall 0.4900 is below the floor 0.5000" in below.reason

    # Beating the champion does not excuse a melanoma recall under the floor.
    assert not decide(
        _metrics(0.9, 0.3), _metrics(0.2, 0.9), GatePolicy(margin=0.0, floors=MEL_ONLY), baseline=RF_ZERO
    ).promoted

    within = decide(
        _metrics(0.604, 0.6), _metrics(0.600, 0.6), GatePolicy(margin=0.005, floors=MEL_ONLY), baseline=RF_ZERO
    )
    assert not within.promoted and "margin 0.0050" in within.reason and "+0.0040" in within.reason

    beats = decide(
        _metrics(0.62, 0.6), _metrics(0.60, 0.6), GatePolicy(margin=0.005, floors=MEL_ONLY), baseline=RF_ZERO
    )
    assert beats.promoted and "beats the champion's 0.6000" in beats.reason

    # "Beats" is strict: an equal score with no margin keeps the champion.
    assert not decide(
        _metrics(0.6, 0.6), _metrics(0.6, 0.6), GatePolicy(margin=0.0, floors=MEL_ONLY), baseline=RF_ZERO
    ).promoted


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
        scored = scorer.score_checkpoint(path, name)
        proba = scored.proba(scorer.tta)
        models[name] = (path, scored.meta, scorer.metrics(proba), f"{prefix}/cnn.pt", proba)
    return {"scorer": scorer, "models": models, "dataset_version": dataset.version, "split": str(split)}


def _gate(
    registry: Registry,
    scored: dict,
    name: str,
    run_id: str,
    tmp_path,
    margin=0.005,
    floor=0.0,
    override=False,
    require_approval=False,
    score_champion=None,
    paired=True,
) -> dict:
    """The gate with the absolute floors off and a Random Forest that scored 0: these tests are about
    the champion (small_models are weak on purpose); the absolute rules have their own test."""
    path, meta, metrics, source, proba = scored["models"][name]
    challenger = Challenger(run_id, path, source, metrics, meta, scored["dataset_version"], scored["split"], proba)
    floors = Floors(mel_recall=floor, macro_f1=0.0, macro_auc=0.0)
    policy = GatePolicy(margin=margin, floors=floors, require_approval=require_approval, allow_broken_champion=override)
    return run_gate(
        registry,
        challenger,
        score_champion or scored["scorer"].score_champion,
        policy,
        tmp_path / run_id,
        baseline={"macro_f1": 0.0},
        compare=scored["scorer"].compare if paired else None,
    )


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
    # Decided by the paired lesion bootstrap of the macro-F1 difference on the same test images: its lower
    # bound clears the margin, and the record keeps the interval.
    paired = better["paired_bootstrap"]
    assert paired["metric"] == "macro_f1" and paired["low"] > 0.005 and paired["low"] <= paired["difference"]
    assert paired["difference"] == pytest.approx(fitted["macro_f1"] - weak["macro_f1"])
    assert paired["images"] == fitted["n"] and f"lower bound {paired['low']:+.4f} clears the margin" in better["reason"]
    # The same pair with a margin inside the interval: the point difference clears it, the lower bound does not.
    unsure = _gate(registry, scored, "weak", "run-4b", tmp_path, margin=-paired["difference"] - 1e-4)
    assert unsure["decision"] == "refused" and "does not clear the margin" in unsure["reason"]
    assert unsure["paired_bootstrap"]["difference"] == pytest.approx(-paired["difference"])
    champion = store.get_json(registry.champion_uri)
    assert champion["run_id"] == "run-4" and champion["previous_champion"]["run_id"] == "run-1"
    assert champion["metrics"]["macro_f1"] == pytest.approx(fitted["macro_f1"])

    history = registry.history()
    assert [(h["run_id"], h["decision"]) for h in history] == [
        ("run-1", "promoted"),
        ("run-2", "refused"),
        ("run-3", "refused"),
        ("run-4", "promoted"),
        ("run-4b", "refused"),
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


def test_a_champion_that_cannot_be_loaded_is_an_incident_not_an_empty_registry(scored, store, bucket, tmp_path):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "fitted", "run-1", tmp_path)
    champion = store.get_json(registry.champion_uri)
    store.delete(champion["model_uri"])

    # The champion's checkpoint is gone: the weak model is NOT promoted; the incident is recorded.
    with pytest.raises(ChampionIncident) as missing:
        _gate(registry, scored, "weak", "run-2", tmp_path)
    assert isinstance(missing.value, StageError) and missing.value.exit_code == 2
    assert "promotion refused: the champion's checkpoint is missing" in str(missing.value)
    assert "allow_broken_champion_override" in str(missing.value) and "\n" not in str(missing.value)
    assert store.get_json(registry.champion_uri) == champion
    assert [(h["run_id"], h["decision"]) for h in registry.history()] == [("run-1", "promoted"), ("run-2", "incident")]

    # A checkpoint whose bytes differ from the recorded sha256 is corrupt: same.
    store.put_bytes(champion["model_uri"], b"not a checkpoint")
    with pytest.raises(ChampionIncident, match="is corrupt"):
        _gate(registry, scored, "weak", "run-3", tmp_path)

    # An unreadable champion.json, or a deleted one while the history records promotions: same.
    store.put_bytes(registry.champion_uri, b"{ not json")
    with pytest.raises(ChampionIncident, match="champion.json is unreadable"):
        _gate(registry, scored, "weak", "run-4", tmp_path)
    store.delete(registry.champion_uri)
    with pytest.raises(ChampionIncident, match="champion.json is missing, but the history records 1 promotions"):
        _gate(registry, scored, "weak", "run-5", tmp_path)
    assert not store.exists(registry.champion_uri)

    # The operator's explicit override: judged as a first model, and the decision says so.
    overridden = _gate(registry, scored, "fitted", "run-6", tmp_path, override=True)
    assert overridden["decision"] == "promoted" and "treated as no champion (override)" in overridden["reason"]
    assert overridden["champion_before"]["override"] == "allow_broken_champion"
    assert store.get_json(registry.champion_uri)["run_id"] == "run-6"


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
        "--min-macro-f1",
        "0",
        "--min-macro-auc",
        "0",
        "--gradcam-images",
        "2",
    )
    summary = result.summary
    assert summary["status"] == "done" and summary["promoted"] is False and summary["decision"] == "refused"
    # Without --baseline there is no Random Forest of this run to beat: nothing is promoted.
    assert "no Random Forest baseline of this run to beat" in summary["promotion_reason"]
    assert summary["champion_uri"] == champion["model_uri"]
    assert store.get_json(registry.champion_uri) == champion
    history = registry.history()
    assert [h["decision"] for h in history] == ["promoted", "refused"]
    weak_sha = sha256_bytes(store.get_bytes(S3Uri.parse(small_models["weak"]).join("cnn.pt")))
    assert history[-1]["challenger"]["model_sha256"] == weak_sha


def _promote(run_stage, registry: Registry, run_id: str, *flags: str, check: bool = True):
    """The promote stage as the DAG runs it, the reviewer's answer as --flag=value items."""
    return run_stage("promote", "--registry", str(registry.uri), "--run-id", run_id, *flags, check=check)


def test_an_approved_challenger_is_promoted_by_the_promote_stage(scored, store, bucket, tmp_path, run_stage):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "weak", "run-1", tmp_path)
    weak_record = store.get_bytes(registry.champion_uri)

    # require_approval: the gate passes the better model but leaves champion.json alone.
    waiting = _gate(registry, scored, "fitted", "run-2", tmp_path, require_approval=True)
    assert (waiting["decision"], waiting["promoted"]) == ("awaiting_approval", False)
    assert "beats the champion's" in waiting["reason"] and waiting["reason"].endswith(
        "awaiting a reviewer's approval (require_approval)"
    )
    assert waiting["pending_uri"] == str(registry.pending_uri("run-2"))
    assert store.get_bytes(registry.champion_uri) == weak_record
    assert not any(
        uri.key.startswith(f"{registry.uri.key}/models/run-2-") for uri, _ in store.list(registry.uri.join("models"))
    )

    approved = _promote(
        run_stage, registry, "run-2", "--decision=Approve", "--reviewer=dr.lee",
        "--comment=recall and F1 both up; fine for the pilot", "--responded-at=2026-03-02T09:30:00+00:00",
    ).summary  # fmt: skip
    assert (approved["stage"], approved["decision"], approved["promoted"]) == ("promote", "promoted", True)
    assert approved["reviewer"] == "dr.lee" and approved["comment"] == "recall and F1 both up; fine for the pilot"
    assert approved["reason"].startswith("approved by dr.lee: recall and F1 both up; fine for the pilot; the gate: ")
    champion = store.get_json(registry.champion_uri)
    assert champion["run_id"] == "run-2" and champion["previous_champion"]["run_id"] == "run-1"
    assert champion["approval"] == {
        "decision": "approved",
        "reviewer": "dr.lee",
        "comment": "recall and F1 both up; fine for the pilot",
        "responded_at": "2026-03-02T09:30:00+00:00",
    }
    assert champion["model_uri"] == approved["champion_uri"] and store.exists(champion["model_uri"])
    assert champion["model_sha256"] == waiting["challenger"]["model_sha256"]
    _, meta, metrics, _, _ = scored["models"]["fitted"]
    assert champion["mel_threshold"] == meta.mel_threshold
    assert champion["operating_point"] == operating_point_record(meta, metrics)
    # Decided: the record left pending/ for approvals/, with the answer.
    assert not store.exists(registry.pending_uri("run-2"))
    assert approved["approval_uri"] == str(registry.decided_uri("run-2"))
    assert store.get_json(registry.decided_uri("run-2"))["resolved"]["decision"] == "promoted"
    # The model card beside the copy, written by the same function the gate promotes with.
    folder = champion["model_uri"].rsplit("/", 1)[0]
    card = store.get_bytes(f"{folder}/model_card.md").decode()
    assert "approved by dr.lee (2026-03-02T09:30:00+00:00): recall and F1 both up" in card
    assert store.get_json(f"{folder}/model_card.json")["decision"]["approval"]["reviewer"] == "dr.lee"
    history = registry.history()
    assert [(h["run_id"], h["decision"]) for h in history] == [
        ("run-1", "promoted"), ("run-2", "awaiting_approval"), ("run-2", "promoted"),
    ]  # fmt: skip
    assert history[-1]["gate"]["history_uri"] == waiting["history_uri"]

    # Applied once: a retry of the task finds the answer applied and changes nothing, also after a crash
    # between the archive and the removal of the pending record.
    again = _promote(run_stage, registry, "run-2", "--decision=approve", "--reviewer=dr.lee").summary
    assert again["status"] == "skipped" and again["decision"] == "promoted"
    store.put_json(registry.pending_uri("run-2"), store.get_json(registry.decided_uri("run-2")) | {"resolved": None})
    again = _promote(run_stage, registry, "run-2", "--decision=approve", "--reviewer=dr.lee").summary
    assert again["status"] == "skipped" and not store.exists(registry.pending_uri("run-2"))
    assert len(registry.history()) == 3
    assert [uri.key for uri, _ in store.list(registry.uri.join("pending"))] == []


def test_a_rejection_is_recorded_with_the_reviewer_and_the_champion_stays(scored, store, bucket, tmp_path, run_stage):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "weak", "run-1", tmp_path)
    before = store.get_bytes(registry.champion_uri)
    _gate(registry, scored, "fitted", "run-2", tmp_path, require_approval=True)

    rejected = _promote(
        run_stage, registry, "run-2", "--decision=reject", "--reviewer=dr.okafor",
        "--comment=melanoma recall interval too wide", "--responded-at=2026-03-02T10:00:00+00:00",
    ).summary  # fmt: skip
    assert (rejected["decision"], rejected["promoted"]) == ("rejected", False)
    assert rejected["reason"] == "rejected by dr.okafor: melanoma recall interval too wide"
    assert store.get_bytes(registry.champion_uri) == before
    last = registry.history()[-1]
    assert (last["run_id"], last["decision"], last["promoted"]) == ("run-2", "rejected", False)
    assert (
        last["approval"]["reviewer"] == "dr.okafor"
        and last["approval"]["comment"] == "melanoma recall interval too wide"
    )
    assert last["champion_uri"] == store.get_json(registry.champion_uri)["model_uri"]
    assert not store.exists(registry.pending_uri("run-2")) and store.exists(registry.decided_uri("run-2"))
    # Nothing of the rejected model went into the registry's models/.
    assert not any("/models/run-2-" in uri.key for uri, _ in store.list(registry.uri.join("models")))

    # An approval that comes after the champion changed is not applied: the gate compared another champion.
    _gate(registry, scored, "fitted", "run-3", tmp_path, require_approval=True)
    other = {"run_id": "run-x", "model_uri": f"s3://{bucket.bucket}/elsewhere/cnn.pt", "model_sha256": "0" * 64}
    store.put_json(registry.champion_uri, other)
    stale = _promote(run_stage, registry, "run-3", "--decision=approve", "--reviewer=dr.lee").summary
    assert (stale["decision"], stale["promoted"]) == ("superseded", False)
    assert "approved by dr.lee (no comment), but the champion changed since the gate" in stale["reason"]
    assert store.get_json(registry.champion_uri) == other


def test_an_approval_nobody_answered_is_recorded_as_a_rejection_by_nobody(scored, store, bucket, tmp_path, run_stage):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "fitted", "run-1", tmp_path, require_approval=True)
    # What the DAG renders when the response timeout chose the default: Reject, no user, no comment.
    flags = ("--decision=Reject", "--reviewer=", "--comment=", "--responded-at=2026-03-08T09:00:00+00:00")
    timed_out = _promote(run_stage, registry, "run-1", *flags, "--timed-out=yes").summary
    assert (timed_out["decision"], timed_out["promoted"], timed_out["reviewer"]) == ("rejected", False, None)
    assert "nobody answered within the approval's response timeout" in timed_out["reason"]
    assert not store.exists(registry.champion_uri)
    last = registry.history()[-1]
    assert last["decision"] == "rejected" and last["approval"]["timed_out"] is True
    assert last["approval"]["reviewer"] is None


def test_promote_refuses_bad_input_in_one_line(scored, store, bucket, tmp_path, run_stage):
    registry = Registry(store, bucket.join("registry", "ham10000"))
    nothing = _promote(run_stage, registry, "run-9", "--decision=approve", "--reviewer=dr.lee", check=False)
    assert nothing.returncode == 2 and len(nothing.stderr.strip().splitlines()) == 1
    assert "no challenger of run run-9 awaits approval" in nothing.error_line
    assert str(registry.pending_uri("run-9")) in nothing.error_line

    _gate(registry, scored, "fitted", "run-1", tmp_path, require_approval=True)
    for flags, named in (
        (["--decision=", "--reviewer=dr.lee"], "--decision"),  # the approval task gave no answer
        (["--decision=maybe", "--reviewer=dr.lee"], "'maybe' is not one of approve, reject"),
        (["--decision=approve", "--reviewer="], "--reviewer is empty"),
        (["--decision=approve", "--reviewer=", "--timed-out=yes"], "a timed-out approval is a rejection"),
    ):
        bad = _promote(run_stage, registry, "run-1", *flags, check=False)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert named in bad.error_line and bad.error_line.startswith("dermaops promote: error:"), bad.error_line
    assert not store.exists(registry.champion_uri)  # nothing was applied
    assert [h["decision"] for h in registry.history()] == ["awaiting_approval"]


# -- concurrent promotions ------------------------------------------------------------------------------


def test_the_embedded_s3_honours_conditional_writes(store, bucket):
    """What the registry's lease and champion.json's write rely on (S3's If-None-Match: * and If-Match),
    proven on the S3 server of the tests, scripts/run and the offline stack (moto's server mode); AWS S3 and
    MinIO (the compose stack's release) document both."""
    uri = bucket.join("registry", "lease.json")
    created = store.put_if(uri, b"first", if_none_match=True)
    assert created
    assert store.put_if(uri, b"second", if_none_match=True) is None  # it exists: the creator already won
    assert store.put_if(uri, b"second", if_match='"0123456789abcdef"') is None  # not the ETag it has
    replaced = store.put_if(uri, b"second", if_match=created)
    assert replaced and replaced != created
    assert store.put_if(uri, b"third", if_match=created) is None  # a stale ETag loses
    assert store.get_with_etag(uri) == (b"second", replaced)
    assert store.put_if(bucket.join("registry", "absent.json"), b"x", if_match=created) is None
    assert store.get_with_etag(bucket.join("registry", "absent.json")) == (None, None)


def test_a_lease_has_one_holder_and_outlives_a_crashed_one(store, bucket, stage_env, caplog):
    import json
    import subprocess
    import sys

    from dermaops.errors import TransientError
    from dermaops.lease import Lease

    uri = bucket.join("registry", "lease.json")
    # A holder that crashes: a process that takes the lease and dies without releasing it.
    crash = (
        "import os, sys\n"
        "from dermaops.lease import Lease\n"
        "from dermaops.store import ArtifactStore, S3Uri\n"
        "Lease(ArtifactStore(), S3Uri.parse(sys.argv[1]), {'purpose': 'a crashing holder'}, ttl=3, wait=0).acquire()\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", crash, str(uri)], env=stage_env, timeout=120).returncode == 9
    # Until it expires nobody else gets it: a waiter gives up (transient, retried) naming the holder.
    with pytest.raises(TransientError, match="is held by a crashing holder"):
        Lease(store, uri, {"purpose": "an impatient waiter"}, ttl=3, wait=0.2).acquire()
    # Then it is taken over, with a warning.
    with Lease(store, uri, {"purpose": "the next holder"}, ttl=30, wait=20) as lease:
        assert lease.still_held() and json.loads(store.get_bytes(uri))["purpose"] == "the next holder"
        with pytest.raises(TransientError, match="is held by the next holder"):
            Lease(store, uri, {"purpose": "a contender"}, ttl=30, wait=0.2).acquire()
    assert "taking over the lease" in caplog.text and "a crashing holder" in caplog.text
    assert json.loads(store.get_bytes(uri))["released"] is True

    # A stalled holder whose lease expired and was taken over does not release the new holder's lease.
    stalled = Lease(store, uri, {"purpose": "a stalled holder"}, ttl=0.5, wait=0)
    stalled.acquire()
    with Lease(store, uri, {"purpose": "the holder after it"}, ttl=30, wait=5):
        assert not stalled.still_held()
        stalled.release()
        assert json.loads(store.get_bytes(uri))["purpose"] == "the holder after it"
        assert "released" not in json.loads(store.get_bytes(uri))


def _cached_scorer(scored: dict):
    """score_champion from the scores computed once per module (looked up by the checkpoint's sha256)."""
    from dermaops.store import sha256_file

    by_sha = {sha256_file(path): (metrics, proba) for path, _, metrics, _, proba in scored["models"].values()}
    return lambda path: by_sha[sha256_file(path)]


def test_two_evaluates_at_once_end_with_the_better_challenger_and_the_history_records_both(
    scored, store, bucket, tmp_path
):
    """The issue's race: challengers A and B both beat the champion, their gates run at once, and both
    re-score the champion before either writes. Without serialization both said "promoted" and
    champion.json ended as whichever wrote last."""
    import threading

    from dermaops.store import ArtifactStore

    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "weak", "run-champion", tmp_path)
    f1 = {name: scored["models"][name][2]["macro_f1"] for name in ("weak", "fitted", "blind")}
    assert f1["fitted"] > f1["blind"] + 0.005 > f1["weak"] + 0.01, f1  # A = fitted, B = blind
    scorer = _cached_scorer(scored)
    both_scored = threading.Barrier(2)

    def racing_scorer(path):
        if not getattr(threading.current_thread(), "raced", False):
            threading.current_thread().raced = True
            both_scored.wait(timeout=120)  # both gates have read the same champion
        return scorer(path)

    results, errors = {}, []

    def gate(name: str, run_id: str) -> None:
        try:
            own = Registry(ArtifactStore(), registry.uri)  # a process of its own, as far as S3 can tell
            # The point difference decides (no paired bootstrap): A beats B by 0.04 on these 42 test lesions,
            # which the bootstrap cannot tell from noise; this test is about the race, not the statistics.
            results[run_id] = _gate(own, scored, name, run_id, tmp_path, score_champion=racing_scorer, paired=False)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=gate, args=args) for args in (("fitted", "run-A"), ("blind", "run-B"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    champion = store.get_json(registry.champion_uri)
    assert champion["run_id"] == "run-A", (results["run-A"]["reason"], results["run-B"]["reason"])

    history = registry.history()
    assert sorted(h["run_id"] for h in history) == ["run-A", "run-B", "run-champion"]
    # One gate wrote first; the other found the champion replaced and judged its model again against it.
    [late] = [h for h in history if h.get("rejudged")]
    first = "run-B" if late["run_id"] == "run-A" else "run-A"
    assert late["rejudged"][0]["champion_run_id"] == "run-champion" and late["rejudged"][0]["decision"] == "promoted"
    assert late["champion_before"]["run_id"] == first
    assert late["reason"].startswith(f"judged again against run {first}, promoted while this gate ran: ")
    # Every promotion in the history replaced the champion it was judged against: none was lost.
    promoted = [h for h in history if h["decision"] == "promoted"]
    befores = [(h["champion_before"] or {}).get("run_id") for h in promoted]
    assert len(befores) == len(set(befores)), befores
    assert champion["previous_champion"]["run_id"] in ("run-champion", "run-B")


def test_two_approvals_applied_at_once_promote_one_and_record_the_other_as_superseded(scored, store, bucket, tmp_path):
    """Two `promote --decision approve` at once, both of challengers judged against the same champion: the
    stale-approval check and the write of champion.json are one step under the registry's lease."""
    import threading

    from dermaops.promotion import resolve_approval
    from dermaops.store import ArtifactStore

    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "weak", "run-champion", tmp_path)
    for name, run_id in (("fitted", "run-A"), ("blind", "run-B")):
        assert _gate(registry, scored, name, run_id, tmp_path, require_approval=True)["decision"] == "awaiting_approval"
    reads = threading.Barrier(2)

    class RacingRegistry(Registry):
        def champion_state(self):
            # Without the lease both approvals read the champion here before either writes (the barrier lets
            # them through together). Under it the second cannot get here before the first has written: the
            # first waits out the barrier's timeout and breaks it.
            try:
                reads.wait(timeout=3)
            except threading.BrokenBarrierError:
                pass
            return super().champion_state()

    results, errors = {}, []

    def approve(run_id: str) -> None:
        try:
            own = RacingRegistry(ArtifactStore(), registry.uri)
            results[run_id] = resolve_approval(own, run_id, True, "dr.lee", "", None, tmp_path / f"approve-{run_id}")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=approve, args=(run_id,)) for run_id in ("run-A", "run-B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert reads.broken  # the two reads of champion.json never overlapped
    decisions = sorted((r["decision"], run_id) for run_id, r in results.items())
    assert [d for d, _ in decisions] == ["promoted", "superseded"], decisions
    winner = next(run_id for run_id, r in results.items() if r["promoted"])
    loser = next(run_id for run_id in results if run_id != winner)
    assert store.get_json(registry.champion_uri)["run_id"] == winner
    assert "but the champion changed since the gate" in results[loser]["reason"]
    history = [(h["run_id"], h["decision"]) for h in registry.history()]
    assert (winner, "promoted") in history and (loser, "superseded") in history


def test_the_subgroup_gate_refuses_a_challenger_built_to_fail_one_group(scored, guarded_model, store, bucket, tmp_path):
    """The champion is the `calibrated` model (melanoma flag at its validation-fitted threshold). The challenger is
    the `guarded` checkpoint (the same weights and calibration, another file) whose test probabilities have p(mel)
    moved to nv on the melanomas of ONE group: the group of sex, age band, localization or dx_type where the
    champion finds the most melanoma lesions. Overall it passes the gate (margin -1: rule 5 holds whatever the
    difference); with the subgroup gate on it is refused, and the decision names that group."""
    import numpy as np
    from dermaops.predictor import operating_point

    scorer = scored["scorer"]
    mel, labels = scorer.mel, scorer.labels
    _, champion_meta, _, _, champion_proba = scored["models"]["calibrated"]
    source = f"{guarded_model}/cnn.pt"
    path = store.download(source, tmp_path / "guarded.pt")
    challenger_scored = scorer.score_checkpoint(path, "guarded")
    meta, proba = challenger_scored.meta, challenger_scored.proba(scorer.tta)
    caught = operating_point(champion_meta, None).flags(champion_proba, mel) & (labels == mel)
    table = scorer.subgroup_table
    attribute, group, idx = max(table.members(), key=lambda m: len(set(scorer.groups[m[2]][caught[m[2]]])))
    assert len(set(scorer.groups[idx][caught[idx]])) >= 3, "the fixture's champion finds too few melanomas"
    failed = proba.copy()
    rows = idx[labels[idx] == mel]
    failed[rows, CLASSES.index("nv")] += failed[rows, mel]
    failed[rows, mel] = 0.0
    n_mel = len(rows)

    def gate(registry, run_id, probabilities, subgroup_check):
        challenger = Challenger(run_id, path, source, scorer.metrics(probabilities), meta, scored["dataset_version"],
                                scored["split"], probabilities)  # fmt: skip
        return run_gate(
            registry, challenger, scorer.score_champion, GatePolicy(margin=-1.0, floors=Floors(0.0, 0.0, 0.0)),
            tmp_path / run_id, baseline={"macro_f1": 0.0}, compare=scorer.compare, subgroup_check=subgroup_check,
        )  # fmt: skip

    registry = Registry(store, bucket.join("registry", "ham10000"))
    _gate(registry, scored, "calibrated", "run-1", tmp_path)
    champion = store.get_json(registry.champion_uri)
    refused = gate(registry, "run-2", failed, scorer.subgroup_check(min_melanomas=n_mel))
    assert refused["decision"] == "refused" and not refused["promoted"]
    assert refused["reason"].startswith(f"subgroup gate: melanoma sensitivity in {attribute} = {group} ({n_mel} test")
    assert "against the champion's" in refused["reason"] and "wholly below 0" in refused["reason"]
    judged = {(g["attribute"], g["group"]): g for g in refused["subgroup_gate"]["groups"]}
    assert judged[(attribute, group)]["worse"] and judged[(attribute, group)]["challenger"] == 0.0
    assert all(g["n_mel"] >= n_mel for g in judged.values())
    assert store.get_json(registry.champion_uri) == champion
    # The same challenger with the gate off (the default) is promoted: the subgroup is what refused it.
    other = Registry(store, bucket.join("registry", "gate-off"))
    _gate(other, scored, "calibrated", "run-1", tmp_path)
    assert gate(other, "run-2", failed, None)["decision"] == "promoted"
    # And the unaltered challenger, which fails no group, passes the gate.
    honest = Registry(store, bucket.join("registry", "honest"))
    _gate(honest, scored, "calibrated", "run-1", tmp_path)
    passed = gate(honest, "run-3", proba, scorer.subgroup_check(min_melanomas=1))
    assert passed["decision"] == "promoted" and passed["subgroup_gate"]["refusal"] is None
    assert passed["subgroup_gate"]["groups"] and not np.any([g["worse"] for g in passed["subgroup_gate"]["groups"]])
