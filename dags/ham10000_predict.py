"""DermaOps batch prediction: the production model (or any stored checkpoint) on a folder of new images.

Thin like the retraining DAG: no heavy imports, no connection or Variable look-ups at parse time.
One task, the `predict` stage, in the torch image (GPU with DERMAOPS_GPU=1), built by the same
runner factory.

Two ways in:
- the UI's Trigger form, with the folder (`images`: an s3:// prefix or a folder/zip on the worker);
- an Asset event on `s3://<bucket>/incoming/ham10000` when a folder of new images has landed; the
  event's extra `{"images": "s3://<bucket>/incoming/ham10000/<batch>/"}` names the folder
  (dermaops_runner.incoming), e.g. from the uploading task's `outlet_events[INCOMING_IMAGES].extra`
  or `POST /api/v2/assets/events {"asset_id": <id>, "extra": {"images": "..."}}`.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import DAG, Asset, Param
from dermaops.config import PredictConfig, dag_argv, stage_param_schemas
from dermaops_runner import stage_task
from dermaops_runner.alerts import alert_dag_failure
from dermaops_runner.incoming import images_to_predict
from dermaops_runner.templating import MACROS

DAG_ID = "dermaops_predict"
BUCKET = os.environ.get("DERMAOPS_BUCKET", "dermaops")
REGISTRY = f"s3://{BUCKET}/registry/ham10000"
INCOMING = f"s3://{BUCKET}/incoming/ham10000"
PREDICTIONS = f"s3://{BUCKET}/predictions"

INCOMING_IMAGES = Asset(uri=INCOMING, group="dermaops")
PREDICTIONS_ASSET = Asset(uri=PREDICTIONS, group="dermaops")

PARAMS = {
    "images": Param(
        INCOMING,
        type="string",
        minLength=1,
        title="Images",
        description="The JPEGs to predict: an s3:// prefix, or a folder or zip on the worker. A run started by an "
        "Asset event reads the folder the event names instead.",
    ),
    "model": Param(
        "champion",
        type="string",
        minLength=1,
        description="champion (the registry's production model) or the s3:// URI of a checkpoint or model prefix.",
    ),
    "force": Param(False, type="boolean", description="Predict again even if this run's outputs are finished."),
    # Grad-CAM, TTA and the prediction-monitoring bounds, defined once with predict's flags
    # (dermaops.config.PredictConfig): title, choices, bounds, description.
    **{
        name: Param(schema.pop("default"), description=schema.pop("description"), **schema)
        for name, schema in stage_param_schemas(PredictConfig).items()
    },
}

DOC = f"""
# DermaOps: batch prediction

`predict`: `python -m dermaops predict --model <champion|s3 uri> --images <folder> --out ...` in the
torch image. Writes `{PREDICTIONS}/<run_id>/predictions.csv` (per image: class probabilities, calibrated
when the model carries a temperature; the melanoma flag at the stored operating point; optional
Grad-CAM) and `predictions.json` (which model, which rule). Each image is `decided`, `refer` (below the
model's referral threshold: no diagnosis) or `out_of_distribution` (unlike the training data: nothing). Each
batch's class mix, referral and out-of-distribution rates go to `{REGISTRY}/monitoring/`; a batch past the
monitoring bounds posts a Slack alert (connection `slack_api_default`).

Trigger it with a folder, or emit an event on the Asset `{INCOMING}` with
`extra={{"images": "{INCOMING}/<batch>/"}}` once a folder of new images has landed.
"""

with DAG(
    dag_id=DAG_ID,
    description="Predict a folder of new dermatoscopic images with the champion model",
    doc_md=DOC,
    schedule=[INCOMING_IMAGES],
    start_date=dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["dermaops", "ham10000", "prediction"],
    params=PARAMS,
    user_defined_macros={**MACROS, "dermaops_images_to_predict": images_to_predict},
    on_failure_callback=alert_dag_failure,
    default_args={"owner": "dermaops", "retries": 1, "retry_delay": dt.timedelta(seconds=60)},
) as dag:
    predict = stage_task(
        "predict",
        [
            "--model",
            "{{ params.model }}",
            "--images",
            "{{ dermaops_images_to_predict(params, triggering_asset_events) }}",
            "--registry",
            REGISTRY,
            "--out",
            f"{PREDICTIONS}/{{{{ dermaops_run_key(run_id) }}}}",
            "{{ '--force' if params.force else '' }}",
            *dag_argv(PredictConfig, recipes=False),
        ],
        outlets=[PREDICTIONS_ASSET],
    )
