"""Whether a run has anything new to train on: the weekly run's "nothing changed" check.

A run retrains only when something would change the model: the dataset version it ingested differs
from the one the champion was trained on, or the recipe (every trigger-form setting of the stages that
produce the model: split, train_baseline, train, as dermaops.config.recipe_values resolves them) differs
from the champion's. Settings of evaluate (floors, margin, TTA) decide the gate, not the model: a change
in them alone does not retrain (use force_retrain to judge the same model again).

Fail towards retraining: no champion, a champion record without a recorded recipe (promoted before
recipes were recorded) or one that cannot be read all mean "retrain" (a broken champion then reaches
evaluate's gate, which reports it as an incident instead of a skip hiding it).
"""

from __future__ import annotations

from dataclasses import dataclass

UNCHANGED = "no new data; champion unchanged"


@dataclass(frozen=True)
class Verdict:
    retrain: bool
    reason: str


def recipe_differences(champion: dict, recipe: dict) -> list[str]:
    """`name: champion's -> this run's` for every recipe setting that differs (keys of either side)."""
    return [
        f"{name}: {champion.get(name)!r} -> {recipe.get(name)!r}"
        for name in sorted(set(champion) | set(recipe))
        if champion.get(name) != recipe.get(name)
    ]


def verdict(champion: dict | None, problem: str, dataset_version: str, recipe: dict, force: bool) -> Verdict:
    """Retrain or not, and why. `champion` is champion.json (None: none, or `problem` says what is wrong)."""
    if force:
        return Verdict(True, "force_retrain is on")
    if champion is None:
        return Verdict(True, f"the champion record is unusable ({problem})" if problem else "no champion yet")
    if champion.get("dataset_version") != dataset_version:
        return Verdict(
            True,
            f"new data: dataset version {dataset_version} differs from the champion's "
            f"{champion.get('dataset_version')} (run {champion.get('run_id')})",
        )
    recorded = champion.get("recipe")
    if not isinstance(recorded, dict):
        return Verdict(True, f"the champion (run {champion.get('run_id')}) records no recipe to compare with")
    changed = recipe_differences(recorded, recipe)
    if changed:
        return Verdict(True, "the recipe differs from the champion's: " + "; ".join(changed))
    return Verdict(
        False,
        f"{UNCHANGED}: dataset version {dataset_version} and the recipe equal those of the champion "
        f"(run {champion.get('run_id')})",
    )
