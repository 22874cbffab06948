"""Decide whether this run has anything new to train on (dermaops.freshness).

Compares the ingested dataset version (--dataset) and this run's recipe (--recipe, the JSON the DAG
renders from its trigger-form params) with the champion's record in --registry. The summary's `retrain`
tells the DAG's short-circuit task whether train, train_baseline and evaluate run; `reason` is what
notify reports ("no new data; champion unchanged: ..." when they do not). --force (the DAG's
force_retrain) always retrains.

Writes decision.json and manifest.json to --out (s3://<bucket>/runs/<run_id>/changes). It always
decides afresh: the champion may have changed since an earlier try of the same run.
"""

from __future__ import annotations

import logging

from dermaops.config import recipe_arg
from dermaops.freshness import verdict
from dermaops.promotion import Registry
from dermaops.stage import Context, StageIO, fingerprint, read_manifest
from dermaops.store import S3Uri

HELP = "skip training when the dataset version and the recipe equal the champion's"
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset version prefix (s3://<b>/datasets/ham10000/<v>)")
    parser.add_argument("--registry", required=True, help="model registry prefix (s3://<b>/registry/ham10000)")
    parser.add_argument(
        "--recipe", type=recipe_arg, required=True, help='the run\'s recipe params, a JSON object: {"epochs": 3, ...}'
    )
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/changes)")


def run(stage_io: StageIO, cfg: None, ctx: Context) -> dict:
    recipe = stage_io.inputs["recipe"]
    dataset_uri = S3Uri.parse(stage_io.inputs["dataset"])
    dataset_version = read_manifest(ctx.store, dataset_uri, "dataset version")["dataset_version"]
    registry = Registry(ctx.store, S3Uri.parse(stage_io.inputs["registry"]))
    champion, problem = registry.champion_record()
    decision = verdict(champion, problem, dataset_version, recipe, stage_io.force)
    log.info("%s: %s", "retrain" if decision.retrain else "skip training", decision.reason)
    summary = {
        "retrain": decision.retrain,
        "reason": decision.reason,
        "forced": bool(stage_io.force),
        "dataset_version": dataset_version,
        "champion_run_id": (champion or {}).get("run_id"),
        "champion_dataset_version": (champion or {}).get("dataset_version"),
    }
    out = ctx.output(stage_io.out, "changes", fingerprint(dataset=str(dataset_uri), recipe=recipe, **summary))
    out.unpublish()
    out.put_json("decision.json", {**summary, "recipe": recipe, "champion_record": str(registry.champion_uri)})
    out.publish(summary)
    return summary
