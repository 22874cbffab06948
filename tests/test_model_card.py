"""Model cards: written by promotion beside every promoted model (real registry, real evaluate stage),
and built from whatever the producing stages recorded (intervals, calibration, operating point)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dermaops.checkpoint import CheckpointMeta
from dermaops.config import TrainConfig, setting
from dermaops.dataset import CLASSES
from dermaops.model_card import CARD_JSON, CARD_MD, build_card, recipe_of, render_card
from dermaops.store import S3Uri

SECTIONS = (
    "## Model details",
    "## Intended use",
    "## Factors",
    "## Training and evaluation data",
    "## Recipe",
    "## Metrics (test split",
    "## Calibration",
    "## Melanoma operating point",
    "## Caveats and known limitations",
    "## Ethical considerations",
    "## Decision history",
)


def test_promotion_writes_the_card_beside_the_immutable_copy(promoted_registry, store):
    champion = promoted_registry["champion"]
    folder = S3Uri.parse(champion["model_uri"].rsplit("/", 1)[0])
    card = store.get_json(folder.join(CARD_JSON))
    text = store.get_bytes(folder.join(CARD_MD)).decode()

    assert card["model_details"]["model_sha256"] == champion["model_sha256"]
    assert card["data"]["dataset_version"] == champion["dataset_version"]
    assert card["data"]["split_uri"] == champion["split_uri"] and card["data"]["split_strategy"] == "lesion"
    assert sum(card["data"]["split_counts"].values()) > 0
    assert card["metrics"]["headline"]["macro_f1"]["value"] == champion["metrics"]["macro_f1"]
    assert set(card["metrics"]["per_class"]) == set(CLASSES)
    assert [h["run_id"] for h in card["decision_history"]] == [promoted_registry["run_id"]]
    assert card["decision_history"][0]["this_model"] is True

    assert all(section in text for section in SECTIONS), text
    assert "Not for diagnosis without a clinician" in text
    assert f"Dataset version `{champion['dataset_version']}`" in text
    for cls in CLASSES:
        assert f"\n| {cls} | " in text
    assert "28x28 px" in text  # the resolution limitation names the model's real input size
    assert "no external validation" in text.lower()
    assert f"| {promoted_registry['run_id']} (this model) | promoted |" in text


def test_card_shows_intervals_calibration_operating_point_and_recipe():
    per_class = {c: {"precision": 0.5, "recall": 0.6, "f1": 0.55, "auc": 0.8, "support": 10} for c in CLASSES}
    per_class["mel"]["recall_ci"] = [0.41, 0.77]
    metrics = {
        "n": 70,
        "accuracy": 0.7,
        "accuracy_ci": [0.6, 0.8],
        "balanced_accuracy": 0.6,
        "macro_f1": 0.55,
        "weighted_f1": 0.68,
        "macro_auc": None,
        "ece": 0.031,
        "per_class": per_class,
        "mel_operating_point": {"threshold": 0.2, "sensitivity": 0.86, "specificity": 0.7},
    }
    meta = CheckpointMeta.for_model("resnet18", CLASSES, 64, "auto", "none").replace(
        phase=2,
        epoch=7,
        temperature=1.7,
        mel_threshold=0.2,
        calibration={"mel_target_sensitivity": 0.85, "val_mel_sensitivity": 0.86, "val_mel_specificity": 0.61},
    )
    decision = {"run_id": "r2", "decided_at": "2026-02-01T00:00:00", "decision": "promoted", "reason": "beats | it"}
    history = [
        {"run_id": "r1", "decided_at": "2026-01-01", "decision": "refused", "reason": "below the floor"},
        {**decision, "challenger": {"model_sha256": "ab" * 32}},
    ]
    card = build_card(
        run_id="r2",
        model_uri="s3://b/registry/ham10000/models/r2-abababababab/cnn.pt",
        model_sha256="ab" * 32,
        meta=meta,
        metrics=metrics,
        dataset_version="v1",
        split_uri="s3://b/runs/r2/split",
        decision=decision,
        history=history,
        train_manifest={"config": {**asdict(TrainConfig()), "epochs": 20, "lr": 0.002, "out": "s3://ignored"}},
        split_manifest=None,
    )
    text = render_card(card)
    assert "| accuracy | 0.7000 [0.6000, 0.8000] |" in text and "| macro_auc | n/a |" in text
    assert "| mel | 0.5000 | 0.6000 [0.4100, 0.7700] | 0.5500 | 0.8000 | 10 |" in text
    assert "Temperature scaling: 1.7" in text and "Expected calibration error (test): 0.031" in text
    assert "Rule: flag melanoma when p(mel) >= 0.2" in text
    # A sentence, not a Python dict.
    assert (
        "- On the test split: Melanoma operating point p(mel) >= 0.200: test sensitivity 0.86, specificity 0.70" in text
    )
    assert "{" not in text.split("## Melanoma operating point", 1)[1].split("##", 1)[0]
    assert "On the validation split, where it was chosen for sensitivity 0.85: sensitivity 0.8600, specificity" in text
    # The heading names the one per-class figure that has an interval.
    assert "Per class (95 % lesion-bootstrap interval in brackets for recall of mel; the rest are point" in text
    assert "- epochs: 20" in text and "- lr: 0.002" in text and "out" not in card["recipe"]
    # Every setting that can change the model, none that cannot (threads, device).
    assert set(card["recipe"]) == set(TrainConfig.recipe_fields()) and "num_threads" not in card["recipe"]
    for name in ("loss_tau", "ema_decay", "mixup_alpha", "cutmix_alpha", "tta", "mel_sensitivity", "patience"):
        assert f"- {name}: " in text, name
    assert "64x64 px" in text
    # The whole history, the refused challenger before this model included; a '|' cannot break the table.
    assert "| r1 | refused | below the floor |" in text and "| r2 (this model) | promoted | beats / it |" in text


def test_card_states_subgroups_referral_and_inputs_unlike_the_training_data():
    per_class = {c: {"precision": 0.5, "recall": 0.6, "f1": 0.55, "auc": 0.8, "support": 10} for c in CLASSES}
    entry = {"value": 0.8, "low": 0.6, "high": 0.9}
    group = {"attribute": "sex", "group": "female", "n": 40, "lesions": 25, "n_mel": 6, "small": True,
             "accuracy": entry, "balanced_accuracy": entry, "macro_f1": {"value": None, "low": None, "high": None},
             "mel_sensitivity": {"value": 0.5, "low": 0.2, "high": 0.83}, "mel_specificity": entry}  # fmt: skip
    metrics = {
        "n": 70, "accuracy": 0.7, "balanced_accuracy": 0.6, "macro_f1": 0.55, "weighted_f1": 0.68, "macro_auc": 0.8,
        "per_class": per_class,
        "subgroups": {"operating_point": "p(mel) >= 0.2000", "small_lesions": 30, "groups": [group]},
        "referral": {"aurc": 0.081, "target_accuracy": 0.9, "test": {"threshold": 0.61, "coverage": 0.72,
                     "coverage_ci": [0.68, 0.76], "accuracy": 0.905, "accuracy_ci": [0.88, 0.93]}},
        "ood": {"threshold": 812.5, "false_flag_rate": 0.052, "detection": {"blurred": 0.91, "overexposed": 0.99},
                "fitted": {"means": "left out of the card"}},
    }  # fmt: skip
    meta = CheckpointMeta.for_model("resnet18", CLASSES, 48, "auto", "none").replace(phase=2, epoch=3)
    decision = {"run_id": "r1", "decided_at": "2026-02-01T00:00:00", "decision": "promoted", "reason": "first"}
    args = dict(
        run_id="r1", model_uri="s3://b/m/cnn.pt", model_sha256="cd" * 32, meta=meta, metrics=metrics,
        dataset_version="v1", split_uri="s3://b/runs/r1/split", decision=decision, history=[decision],
        train_manifest=None, split_manifest=None,
    )  # fmt: skip
    card = build_card(**args)
    text = render_card(card)
    assert "## Subgroups (test split)" in text and "| sex | female (small) | 40 | 6 |" in text
    assert "0.500 [0.200, 0.830]" in text and "sex, age band, anatomic site" in card["factors"]["evaluated"][1]
    assert "coverage 0.7200 [0.6800, 0.7600] of the images are decided, with accuracy 0.9050 [0.8800, 0.9300]" in text
    assert "below 0.6100 are referred" in text and "an accuracy of 0.9" in text
    assert "On the test split 0.0520 of genuine images are flagged; corrupted copies detected: blurred 0.910" in text
    assert "fitted" not in card["out_of_distribution"]
    # A model evaluated before the guards existed says so instead of leaving the reader guessing.
    bare = render_card(build_card(**{**args, "metrics": {**metrics, "referral": None, "ood": None}}))
    assert "No referral threshold: every image gets a prediction." in bare and "No out-of-distribution detector" in bare


def test_a_setting_added_to_the_train_config_reaches_the_card_with_no_edit():
    @dataclass(frozen=True)
    class WithANewSetting(TrainConfig):
        new_knob: float = setting(0.5, "a setting added later", lo=0.0, hi=1.0)
        new_threads: int = setting(1, "CPU threads of something new", lo=1, hi=64, fingerprint=False)

    config = {"epochs": 3, "new_knob": 0.25, "new_threads": 8, "out": "s3://b/runs/r/models/cnn"}
    assert recipe_of(config, WithANewSetting) == {"epochs": 3, "new_knob": 0.25}
    assert recipe_of(config) == {"epochs": 3}  # the real TrainConfig has no such setting
    assert recipe_of({"out": "s3://b/x"}) is None  # the manifest recorded no setting: "Not recorded"
