"""DermaOps: weekly retraining of the HAM10000 skin-lesion classifier (DESIGN.md, "The DAG").

Thin on purpose: no heavy imports, no connection or Variable look-ups at parse time. Every task is a
stage command (`python -m dermaops <stage> ...`) built by the runner factory in plugins/dermaops_runner,
which runs it in a container (DERMAOPS_RUNNER=docker, default) or as a local subprocess (=local).
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import DAG, Asset, Param, TriggerRule
from dermaops_runner import stage_task
from dermaops_runner.alerts import alert_dag_failure
from dermaops_runner.templating import MACROS

DAG_ID = "dermaops_ham10000"
# Deployment setting, not a run knob: the bucket every run reads and writes (env, read at parse time).
BUCKET = os.environ.get("DERMAOPS_BUCKET", "dermaops")
DATASETS = f"s3://{BUCKET}/datasets/ham10000"
REGISTRY = f"s3://{BUCKET}/registry/ham10000"
RUN = f"s3://{BUCKET}/runs/{{{{ dermaops_run_key(run_id) }}}}"
DATASET_URI = "{{ ti.xcom_pull(task_ids='ingest')['dataset_uri'] }}"
DATAVERSE_SOURCE = "https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T"
STAGES = ("ingest", "validate", "split", "train_baseline", "train", "evaluate")

# Lineage: named by their URIs, so deployments (buckets) sharing one Airflow never collide on a name.
DATASET_ASSET = Asset(uri=DATASETS, group="dermaops")
CHAMPION_ASSET = Asset(uri=f"{REGISTRY}/champion.json", group="dermaops")


def flag_if(param: str, flag: str = "--force") -> str:
    """A flag present only when the boolean param is true (the runner drops empty argv items)."""
    return f"{{{{ '{flag}' if params.{param} else '' }}}}"


PARAMS = {
    "source": Param(
        DATAVERSE_SOURCE,
        type="string",
        minLength=1,
        title="Data source",
        description="Where HAM10000 comes from: an http(s) base URL, a Dataverse dataset URL or doi:..., "
        "an s3:// prefix, or a directory on the worker, in the official layout (metadata CSV + two image zips).",
    ),
    "force_ingest": Param(
        False, type="boolean", description="Re-download and re-verify the data even if this content is stored."
    ),
    "split_strategy": Param(
        "lesion",
        enum=["lesion", "image"],
        description="lesion: stratified by dx and grouped by lesion_id (honest); "
        "image: image-level split like the seed report (leaks lesions, for comparison only).",
    ),
    "seed": Param(42, type="integer", minimum=0, maximum=2**32 - 1, description="Random seed of split and training."),
    "arch": Param("resnet50", enum=["resnet18", "resnet34", "resnet50"], description="torchvision ResNet backbone."),
    "pretrained": Param(
        "none",
        type="string",
        minLength=1,
        description="Initial weights: none, imagenet (must be in the torch hub cache), or a path / s3:// URI.",
    ),
    "image_size": Param(64, type="integer", minimum=16, maximum=512, description="Square input size in pixels."),
    "epochs": Param(20, type="integer", minimum=1, maximum=500, description="Phase 1 epochs (frozen backbone)."),
    "finetune_epochs": Param(
        5, type="integer", minimum=0, maximum=200, description="Phase 2 epochs (last block unfrozen)."
    ),
    "batch_size": Param(128, type="integer", minimum=8, maximum=4096, description="Training batch size."),
    "lr": Param(2e-3, type="number", exclusiveMinimum=0, maximum=1, description="Phase 1 peak learning rate."),
    "finetune_lr": Param(1e-5, type="number", exclusiveMinimum=0, maximum=1, description="Phase 2 peak learning rate."),
    "finetune_depth": Param(
        1, type="integer", minimum=1, maximum=4, description="Residual stages unfrozen in phase 2 (1 = layer4)."
    ),
    "weight_decay": Param(5e-4, type="number", minimum=0, maximum=1, description="AdamW weight decay."),
    "label_smoothing": Param(0.0, type="number", minimum=0, maximum=0.5, description="Label smoothing of the loss."),
    "class_weight_power": Param(
        1.0,
        type="number",
        minimum=0,
        maximum=1,
        description="Loss class weight = (inverse class frequency) ** power: 1 balances the classes fully, "
        "0.5 is milder (better accuracy, slightly lower minority recall), 0 turns class weights off.",
    ),
    "max_train_images": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        description="Train the CNN on a seeded random subset of at most this many images (empty: all). For quick runs.",
    ),
    "baseline_trees": Param(
        300, type="integer", minimum=10, maximum=5000, description="Trees in the Random Forest baseline."
    ),
    "force_retrain": Param(
        False, type="boolean", description="Retrain both models even if this run already has finished ones."
    ),
    "promotion_margin": Param(
        0.005,
        type="number",
        minimum=0,
        maximum=1,
        description="The challenger must beat the champion's test macro F1 by more than this to be promoted.",
    ),
    "mel_recall_floor": Param(
        0.5, type="number", minimum=0, maximum=1, description="Minimum melanoma recall for any promotion."
    ),
    "min_macro_f1": Param(
        0.25,
        type="number",
        minimum=0,
        maximum=1,
        description="Absolute floor on test macro F1 for any promotion, the first champion's included (0 = off).",
    ),
    "min_macro_auc": Param(
        0.75,
        type="number",
        minimum=0,
        maximum=1,
        description="Absolute floor on test macro AUC for any promotion (0.5 = chance; 0 = off).",
    ),
    "allow_subset_promotion": Param(
        False,
        type="boolean",
        description="Allow promoting a model trained on a max_train_images subset (never promoted otherwise).",
    ),
    "allow_broken_champion_override": Param(
        False,
        type="boolean",
        description="Operator override, logged: if the registry's champion cannot be loaded, judge the new model as "
        "if there were no champion instead of failing the run (an incident otherwise).",
    ),
}

DOC = f"""
# DermaOps: HAM10000 retraining

`ingest → validate → split → {{train_baseline, train}} → evaluate → notify`

Every task runs one stage, `python -m dermaops <stage> [flags]`, in a container (or a subprocess with
`DERMAOPS_RUNNER=local`). The trigger form's parameters become the stages' flags. Stages exchange
artifacts through S3 (bucket `{BUCKET}`):

- dataset versions: `{DATASETS}/<dataset_version>/` (immutable, content-addressed);
- this run: `s3://{BUCKET}/runs/<run_id>/{{validation,split,models,evaluation,notify}}/`
  (`<run_id>` with characters outside `A-Za-z0-9._-` replaced by `-`);
- the production model: `{REGISTRY}/champion.json`, changed only when the challenger wins.

`notify` runs whatever happened upstream: it writes the run report (`notify/report.md`) and posts
it to Slack. It is a teardown task, so the run's state is the pipeline's, not the notification's.
A failed run also sends a Slack alert from the DAG's failure callback.
"""

with DAG(
    dag_id=DAG_ID,
    description="Retrain, evaluate and promote the HAM10000 skin-lesion classifier",
    doc_md=DOC,
    schedule="0 3 * * 1",  # weekly, Monday 03:00 UTC
    start_date=dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["dermaops", "ham10000", "retraining"],
    params=PARAMS,
    user_defined_macros=MACROS,
    on_failure_callback=alert_dag_failure,
    default_args={"owner": "dermaops", "retries": 1, "retry_delay": dt.timedelta(seconds=60)},
) as dag:
    ingest = stage_task(
        "ingest",
        ["--source", "{{ params.source }}", "--datasets", DATASETS, flag_if("force_ingest")],
        retries=3,
        # Airflow 3: the multiplier doubles the delay per try (30 s, 60 s, 120 s, each with up to
        # +100 % deterministic jitter), capped at max_retry_delay.
        retry_delay=dt.timedelta(seconds=30),
        retry_exponential_backoff=2.0,
        max_retry_delay=dt.timedelta(seconds=120),
        outlets=[DATASET_ASSET],
    )
    validate = stage_task("validate", ["--dataset", DATASET_URI, "--out", f"{RUN}/validation"])
    split = stage_task(
        "split",
        [
            "--dataset",
            DATASET_URI,
            "--out",
            f"{RUN}/split",
            "--strategy",
            "{{ params.split_strategy }}",
            "--seed",
            "{{ params.seed }}",
        ],
    )
    train_baseline = stage_task(
        "train_baseline",
        [
            "--split",
            f"{RUN}/split",
            "--out",
            f"{RUN}/models/baseline",
            "--n-estimators",
            "{{ params.baseline_trees }}",
            # Same size as the CNN, so both read one shared decoded-image cache.
            "--image-size",
            "{{ params.image_size }}",
            "--seed",
            "{{ params.seed }}",
            flag_if("force_retrain"),
        ],
    )
    train = stage_task(
        "train",
        [
            "--split",
            f"{RUN}/split",
            "--out",
            f"{RUN}/models/cnn",
            "--arch",
            "{{ params.arch }}",
            "--pretrained",
            "{{ params.pretrained }}",
            "--image-size",
            "{{ params.image_size }}",
            "--epochs",
            "{{ params.epochs }}",
            "--finetune-epochs",
            "{{ params.finetune_epochs }}",
            "--batch-size",
            "{{ params.batch_size }}",
            "--lr",
            "{{ params.lr }}",
            "--finetune-lr",
            "{{ params.finetune_lr }}",
            "--finetune-depth",
            "{{ params.finetune_depth }}",
            "--weight-decay",
            "{{ params.weight_decay }}",
            "--label-smoothing",
            "{{ params.label_smoothing }}",
            "--class-weight-power",
            "{{ params.class_weight_power }}",
            "--seed",
            "{{ params.seed }}",
            "{{ '--max-train-images=%d' % params.max_train_images if params.max_train_images else '' }}",
            flag_if("force_retrain"),
        ],
    )
    evaluate = stage_task(
        "evaluate",
        [
            "--split",
            f"{RUN}/split",
            "--model",
            f"{RUN}/models/cnn",
            "--baseline",
            f"{RUN}/models/baseline",
            "--out",
            f"{RUN}/evaluation",
            "--registry",
            REGISTRY,
            "--run-id",
            "{{ run_id }}",
            "--promotion-margin",
            "{{ params.promotion_margin }}",
            "--mel-recall-floor",
            "{{ params.mel_recall_floor }}",
            "--min-macro-f1",
            "{{ params.min_macro_f1 }}",
            "--min-macro-auc",
            "{{ params.min_macro_auc }}",
            flag_if("allow_subset_promotion", "--allow-subset-promotion"),
            flag_if("allow_broken_champion_override", "--allow-broken-champion-override"),
        ],
        outlets=[CHAMPION_ASSET],
    )
    notify = stage_task(
        "notify",
        [
            "--run-id",
            "{{ run_id }}",
            "--dag-id",
            "{{ dag.dag_id }}",
            "--states",
            "{{ dermaops_task_states(ti, dag_run) }}",
            "--results",
            "{{ dermaops_stage_results(ti, " + repr(list(STAGES)) + ") }}",
            "{{ '--started-at=' ~ dag_run.start_date.isoformat() if dag_run.start_date else '' }}",
            "--report-out",
            f"{RUN}/notify",
        ],
        secrets=("s3", "slack"),
        retries=0,
        trigger_rule=TriggerRule.ALL_DONE,
    )
    # A teardown does not decide the run's state: a failed pipeline fails the run (and fires the
    # failure callback) even though notify, which reports the failure, succeeds.
    notify.is_teardown = True

    ingest >> validate >> split >> [train_baseline, train] >> evaluate >> notify
