"""DermaOps: weekly retraining of the HAM10000 skin-lesion classifier (docs/architecture.md, "The DAG").

Thin on purpose: no heavy imports, no connection or Variable look-ups at parse time. Every task is a
stage command (`python -m dermaops <stage> ...`) built by the runner factory in plugins/dermaops_runner,
which runs it in a container (DERMAOPS_RUNNER=docker, default) or as a local subprocess (=local).
The trigger form's params and the flags they become are derived from the stages' typed settings
(dermaops.config); the stages, their images and secrets come from the stage registry (dermaops.pipeline).
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Asset, Param, TriggerRule
from dermaops.config import RECIPES, dag_argv, param_names, param_schema, recipe_summary
from dermaops.pipeline import PIPELINE
from dermaops_runner import stage_task
from dermaops_runner.alerts import alert_dag_failure
from dermaops_runner.approval import APPROVE, REJECT, SlackApprovalRequest, approval_needed, response_timeout
from dermaops_runner.marks import outcome_task
from dermaops_runner.templating import MACROS, retrain_needed

DAG_ID = "dermaops_ham10000"
# Deployment setting, not a run knob: the bucket every run reads and writes (env, read at parse time).
BUCKET = os.environ.get("DERMAOPS_BUCKET", "dermaops")
DATASETS = f"s3://{BUCKET}/datasets/ham10000"
REGISTRY = f"s3://{BUCKET}/registry/ham10000"
RUN = f"s3://{BUCKET}/runs/{{{{ dermaops_run_key(run_id) }}}}"
DATASET_URI = "{{ ti.xcom_pull(task_ids='ingest')['dataset_uri'] }}"
RECIPE = "{{ dermaops_recipe(params) }}"

# Lineage: named by their URIs, so deployments (buckets) sharing one Airflow never collide on a name.
DATASET_ASSET = Asset(uri=DATASETS, group="dermaops")
CHAMPION_ASSET = Asset(uri=f"{REGISTRY}/champion.json", group="dermaops")


def flag_if(param: str, flag: str = "--force") -> str:
    """A flag present only when the boolean param is true (the runner drops empty argv items)."""
    return f"{{{{ '{flag}' if params.{param} else '' }}}}"


def _param(name: str) -> Param:
    schema = param_schema(name)
    return Param(schema.pop("default"), description=schema.pop("description"), **schema)


PARAMS = {name: _param(name) for name in param_names()}

RECIPE_LINES = "; ".join(f"`{name}`: {recipe_summary(name)}" for name in RECIPES)
DOC = f"""
# DermaOps: HAM10000 retraining

`ingest → validate → split → changes → retrain_needed → {{train_baseline, train}} → evaluate → approval_needed
→ approve → promote → notify → outcome`

Every task runs one stage, `python -m dermaops <stage> [flags]`, in a container (or a subprocess with
`DERMAOPS_RUNNER=local`). The trigger form's parameters become the stages' flags. Stages exchange
artifacts through S3 (bucket `{BUCKET}`):

- dataset versions: `{DATASETS}/<dataset_version>/` (immutable, content-addressed);
- this run: `s3://{BUCKET}/runs/<run_id>/{{validation,split,models,evaluation,notify}}/`
  (`<run_id>` with characters outside `A-Za-z0-9._-` replaced by `-`);
- the production model: `{REGISTRY}/champion.json`, changed only when the challenger wins.

**Recipe.** {RECIPE_LINES}. The first is the default. Every training param left blank takes the recipe's
value; a value typed in overrides it.

**Nothing new, nothing trained.** `changes` compares the ingested dataset version and the recipe (the
training params as resolved) with the champion's; when both are equal, `retrain_needed` short-circuits
`train_baseline`, `train` and `evaluate` (skipped) and notify says "no new data; champion unchanged".
`force_retrain` trains anyway.

**Human approval.** With `require_approval`, a challenger that passes the gate is not promoted by
evaluate: `approve` waits for a reviewer (Browse → Required Actions, the run's `approve` task, or the
REST API), Slack gets the link, and `promote` applies the answer: Approve writes champion.json and the
model card, Reject records the rejection with the reviewer and the comment in the registry history.
Without it, or when the gate refuses, `approval_needed` skips `approve` and `promote`. While a run
waits, the next weekly run queues behind it (one active run).

**Schedule.** Weekly, Monday 03:00 UTC, without catch-up: unpausing the DAG starts a run for the latest
weekly interval at once, and then one run a week.

`notify` runs whatever happened upstream: it writes the run report (`notify/report.md`) and posts
it to Slack. It is a teardown task, so the run's state is the pipeline's. `outcome`, the last teardown,
fails the run in the two cases the tasks alone would leave green: notify still failed after its retries
(Slack down for minutes: nobody mistakes the run for a delivered success), or an operator marked the run
failed (the report says who and when, from Airflow's audit log). A failed run also sends a Slack alert
from the DAG's failure callback.

**Source.** The `source` param left blank ingests the deployment's source: the Airflow Variable
`dermaops_source` (`scripts/stack seed` sets it), or Harvard Dataverse when it is unset. The weekly
runs use it; a value typed in the form overrides it for one run.
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
        ["--source", "{{ dermaops_source(params) }}", "--datasets", DATASETS, flag_if("force_ingest")],
        retries=3,
        # Airflow 3: the multiplier doubles the delay per try (30 s, 60 s, 120 s, each with up to
        # +100 % deterministic jitter), capped at max_retry_delay.
        retry_delay=dt.timedelta(seconds=30),
        retry_exponential_backoff=2.0,
        max_retry_delay=dt.timedelta(seconds=120),
        outlets=[DATASET_ASSET],
    )
    validate = stage_task(
        "validate",
        [
            "--dataset",
            DATASET_URI,
            "--out",
            f"{RUN}/validation",
            "--drift-registry",
            REGISTRY,
            *dag_argv("validate"),
        ],
    )
    split = stage_task("split", ["--dataset", DATASET_URI, "--out", f"{RUN}/split", *dag_argv("split")])
    changes = stage_task(
        "changes",
        [
            "--dataset",
            DATASET_URI,
            "--registry",
            REGISTRY,
            "--recipe",
            RECIPE,
            "--out",
            f"{RUN}/changes",
            flag_if("force_retrain"),
        ],
    )
    # Skips only its direct downstream (the two trainings); evaluate is then skipped by its own
    # all_success rule, while notify (all_done) still runs and reports why.
    retrain = ShortCircuitOperator(
        task_id="retrain_needed",
        python_callable=retrain_needed,
        ignore_downstream_trigger_rules=False,
        retries=0,
        doc_md="Short-circuits training when `changes` found the data and the recipe equal to the champion's.",
    )
    train_baseline = stage_task(
        "train_baseline",
        # image_size is the CNN's, so both read one shared decoded-image cache.
        [
            "--split",
            f"{RUN}/split",
            "--out",
            f"{RUN}/models/baseline",
            *dag_argv("train_baseline"),
            flag_if("force_retrain"),
        ],
    )
    train = stage_task(
        "train",
        ["--split", f"{RUN}/split", "--out", f"{RUN}/models/cnn", *dag_argv("train"), flag_if("force_retrain")],
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
            "--recipe",
            RECIPE,
            *dag_argv("evaluate"),
        ],
        outlets=[CHAMPION_ASSET],
    )
    # Only a challenger that evaluate left awaiting approval (require_approval and the gate passed) gets the
    # approval task; otherwise approve and promote are skipped and notify (all_done) reports evaluate's decision.
    approval = ShortCircuitOperator(
        task_id="approval_needed",
        python_callable=approval_needed,
        ignore_downstream_trigger_rules=False,
        retries=0,
        doc_md="Short-circuits the approval when evaluate's gate did not leave a challenger awaiting approval.",
    )
    approve = HITLOperator(
        task_id="approve",
        subject="Promote the challenger of run {{ run_id }} to champion?",
        body="{{ dermaops_approval_body(ti) }}",
        options=[APPROVE, REJECT],
        params={
            "comment": Param(
                "",
                type=["string", "null"],
                title="Comment",
                description="Why you approve or reject: recorded with your name in the registry's decision history.",
            )
        },
        # No answer within the timeout: Airflow answers Reject for nobody, and promote records that.
        defaults=[REJECT],
        response_timeout=response_timeout(),
        notifiers=[SlackApprovalRequest()],
        retries=0,
        doc_md="Waits for a reviewer's Approve or Reject (Required Actions, or the REST API's hitlDetails); "
        "with no answer within $DERMAOPS_APPROVAL_TIMEOUT_HOURS (default 144), the challenger is rejected.",
    )
    promote = stage_task(
        "promote",
        [
            "--registry",
            REGISTRY,
            "--run-id",
            "{{ run_id }}",
            # --flag=value items: an empty answer still renders as one item, which promote names in its error.
            "--decision={{ dermaops_approval(ti, 'decision') }}",
            "--reviewer={{ dermaops_approval(ti, 'reviewer') }}",
            "--comment={{ dermaops_approval(ti, 'comment') }}",
            "--responded-at={{ dermaops_approval(ti, 'responded_at') }}",
            "--timed-out={{ dermaops_approval(ti, 'timed_out') }}",
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
            "{{ dermaops_stage_results(ti, " + repr(list(PIPELINE)) + ") }}",
            "{{ '--started-at=' ~ dag_run.start_date.isoformat() if dag_run.start_date else '' }}",
            "{{ '--marked-failed=' ~ dermaops_run_mark(ti, dag_run) if dermaops_run_mark(ti, dag_run) else '' }}",
            "--report-out",
            f"{RUN}/notify",
        ],
        # Slack unreachable is transient (exit 3): retried, 60 s, 120 s, 240 s apart (each with up to +100 %
        # jitter). A bad token or channel (exit 2) is not retried.
        retries=3,
        retry_delay=dt.timedelta(seconds=60),
        retry_exponential_backoff=2.0,
        max_retry_delay=dt.timedelta(seconds=300),
        trigger_rule=TriggerRule.ALL_DONE,
    )
    # Teardowns run whatever happened upstream, even after an operator marked the run failed. The run's state
    # is then Airflow's verdict on the leaf tasks: promote (upstream_failed when a stage failed) and outcome.
    # notify must not fail the run itself: a teardown with on_failure_fail_dagrun hides its upstream tasks
    # from that verdict, and a failed stage would leave the run green. outcome carries that role instead.
    notify.is_teardown = True
    # Fails the run when an operator marked it failed (every unfinished task skipped, nothing failed) or when
    # notify failed after its retries: the run must not look green while its report never reached Slack.
    outcome = outcome_task()

    ingest >> validate >> split >> changes >> retrain >> [train_baseline, train] >> evaluate
    evaluate >> approval >> approve >> promote >> notify >> outcome
