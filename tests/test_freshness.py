"""The "nothing changed" check (dermaops.freshness) and what notify says about a skipped training."""

from __future__ import annotations

import argparse

import pytest
from dermaops.config import RECIPES, recipe_arg, recipe_param_names, recipe_values
from dermaops.freshness import UNCHANGED, Verdict, verdict
from dermaops.run_report import build_report, render_markdown, slack_message

RECIPE = recipe_values({"recipe": "quick-cpu", "epochs": 2})
CHAMPION = {"run_id": "run-a", "dataset_version": "v1", "recipe": RECIPE, "model_uri": "s3://b/m", "model_sha256": "0"}


def test_recipe_is_the_model_making_params_resolved_against_the_named_recipe():
    names = recipe_param_names()
    assert {"epochs", "arch", "image_size", "seed", "split_strategy", "baseline_trees", "max_train_images"} <= set(
        names
    )
    assert not {"promotion_margin", "mel_recall_floor", "tta", "force_retrain", "source"} & set(names)
    assert RECIPE["epochs"] == 2 and RECIPE["lr"] == RECIPES["quick-cpu"]["lr"]
    # A blank param takes the named recipe's value, not the default recipe's.
    full, quick = RECIPES["full-gpu"]["image_size"], RECIPES["quick-cpu"]["image_size"]
    assert recipe_values({"recipe": "full-gpu"})["image_size"] == full != quick


def test_same_data_and_recipe_skip_and_anything_else_retrains():
    same = verdict(CHAMPION, "", "v1", dict(RECIPE), force=False)
    assert not same.retrain and same.reason.startswith(UNCHANGED) and "run-a" in same.reason
    assert verdict(CHAMPION, "", "v1", dict(RECIPE), force=True) == Verdict(True, "force_retrain is on")
    new_data = verdict(CHAMPION, "", "v2", dict(RECIPE), force=False)
    assert new_data.retrain and "v2 differs from the champion's v1" in new_data.reason
    changed = verdict(CHAMPION, "", "v1", {**RECIPE, "epochs": 5}, force=False)
    assert changed.retrain and "epochs: 2 -> 5" in changed.reason
    assert verdict(None, "", "v1", RECIPE, False).reason == "no champion yet"
    broken = verdict(None, "the champion record is unreadable", "v1", RECIPE, False)
    assert broken.retrain and "unusable" in broken.reason
    old = {k: v for k, v in CHAMPION.items() if k != "recipe"}  # promoted before recipes were recorded
    assert verdict(old, "", "v1", RECIPE, False).retrain


def test_recipe_flag_refuses_what_is_not_a_recipe():
    assert recipe_arg('{"epochs": 3}') == {"epochs": 3}
    for bad, words in (("[1]", "JSON object"), ("{", "not valid JSON"), ('{"tta": true}', "unknown recipe params")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            recipe_arg(bad)


def test_notify_says_no_new_data_when_training_was_skipped():
    reason = f"{UNCHANGED}: dataset version v1 and the recipe equal those of the champion (run run-a)"
    states = {"ingest": "success", "changes": "success", "train": "skipped", "evaluate": "skipped"}
    results = {"changes": {"summary": {"retrain": False, "reason": reason}, "error": None}}
    report = build_report("dag", "run-b", states, results, "s3://b/runs/run-b/notify/report.md")
    assert report.outcome == "success" and report.unchanged == reason
    assert f"Training skipped, {reason}." in render_markdown(report)
    _, blocks = slack_message(report)
    assert f"*training skipped*: {reason}" in str(blocks)
