"""The DAG file parses cleanly and says what docs/architecture.md's table says: tasks, order, retries,
images, trigger rules, params. Parsing happens in this process with the network and every connection and
Variable look-up made to fail, so a parse-time look-up would show up as an import error."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

import pytest
from dermaops.pipeline import STAGES as REGISTRY

from tests.support.airflow_env import ROOT, airflow_base_env

STAGES = tuple(s.name for s in REGISTRY if s.dag == "retrain")
# The DAG's tasks that are not stages: two short circuits, the human-in-the-loop approval and the run's verdict.
NON_STAGES = ("retrain_needed", "approval_needed", "approve", "outcome")
TORCH_STAGES = tuple(s.name for s in REGISTRY if s.dag == "retrain" and s.image == "torch")


class ParseTimeLookup(AssertionError):
    pass


def _forbidden(what: str):
    def fail(*args, **kwargs):
        raise ParseTimeLookup(f"{what} called while parsing the DAG file")

    return fail


@pytest.fixture(scope="module")
def airflow_config(tmp_path_factory):
    """Airflow configured through the environment BEFORE airflow is first imported in this process."""
    saved = dict(os.environ)
    os.environ.update(airflow_base_env(tmp_path_factory.mktemp("airflow-parse")))
    # A connection that would be used if anything looked it up at parse time: it points nowhere.
    os.environ["AIRFLOW_CONN_DERMAOPS_S3"] = "aws://bogus:bogus@nonexistent.invalid:1"
    os.environ["DERMAOPS_BUCKET"] = "lesions"
    yield
    os.environ.clear()
    os.environ.update(saved)


def parse(monkeypatch, **env: str):
    """A DagBag of dags/ parsed with no network and no connection/Variable look-ups allowed."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Connection, Variable

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(socket.socket, "connect", _forbidden("socket.connect"))
    monkeypatch.setattr(BaseHook, "get_connection", _forbidden("BaseHook.get_connection"))
    monkeypatch.setattr(Connection, "get", _forbidden("Connection.get"))
    monkeypatch.setattr(Variable, "get", _forbidden("Variable.get"))
    bag = DagBag(dag_folder=ROOT / "dags")
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["dermaops_ham10000"]


@pytest.fixture
def docker_dag(airflow_config, monkeypatch):
    return parse(monkeypatch, DERMAOPS_RUNNER="docker")


def test_dag_shape_schedule_and_docs(docker_dag):
    dag = docker_dag
    assert set(dag.task_ids) == {*STAGES, *NON_STAGES}
    downstream = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {
        "ingest": {"validate"},
        "validate": {"split"},
        "split": {"changes"},
        "changes": {"retrain_needed"},
        "retrain_needed": {"train_baseline", "train"},
        "train_baseline": {"evaluate"},
        "train": {"evaluate"},
        "evaluate": {"approval_needed"},
        "approval_needed": {"approve"},
        "approve": {"promote"},
        "promote": {"notify"},
        "notify": {"outcome"},
        "outcome": set(),
    }
    assert dag.schedule == "0 3 * * 1"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert {"dermaops", "ham10000"} <= set(dag.tags)
    assert "ingest → validate → split" in dag.doc_md
    assert dag.on_failure_callback is not None
    # Nothing new: the short circuit skips only the trainings; evaluate follows by its own rule, notify runs.
    gate = dag.get_task("retrain_needed")
    assert type(gate).__name__ == "ShortCircuitOperator" and gate.ignore_downstream_trigger_rules is False
    assert dag.get_task("evaluate").trigger_rule == "all_success"
    # Human approval: skipped (Airflow's short circuit) unless evaluate left a challenger awaiting it.
    approval = dag.get_task("approval_needed")
    assert type(approval).__name__ == "ShortCircuitOperator" and approval.ignore_downstream_trigger_rules is False
    assert dag.get_task("promote").trigger_rule == "all_success"


def test_the_approval_task_is_a_hitl_operator_that_leaves_the_answer_to_promote(docker_dag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
    from dermaops_runner.approval import SlackApprovalRequest

    approve = docker_dag.get_task("approve")
    # Not ApprovalOperator: its Reject would skip promote, which records the rejection in the registry.
    assert isinstance(approve, HITLOperator) and not isinstance(approve, ApprovalOperator)
    assert approve.options == ["Approve", "Reject"] and approve.multiple is False
    # Nobody answers within 6 days (under the weekly schedule): Airflow answers Reject for nobody.
    assert approve.defaults == ["Reject"] and approve.response_timeout == dt.timedelta(hours=144)
    assert list(approve.params.keys()) == ["comment"]  # only the form field, not the DAG's params
    assert "null" in approve.params.get_param("comment").schema["type"]  # a comment is optional
    assert [type(n) for n in approve.notifiers] == [SlackApprovalRequest]
    # Its rendered fields: the request's subject and body, built from evaluate's summary, nothing else.
    assert set(approve.template_fields) == {"subject", "body"}
    assert approve.retries == 0


def test_retries_and_delays_follow_the_design_table(docker_dag):
    ingest = docker_dag.get_task("ingest")
    assert ingest.retries == 3
    assert ingest.retry_delay == dt.timedelta(seconds=30)
    assert ingest.retry_exponential_backoff == 2.0  # Airflow 3: a multiplier; True would mean 1.0 (constant)
    assert ingest.max_retry_delay == dt.timedelta(seconds=120)
    for task_id in ("validate", "split", "train_baseline", "train", "evaluate"):
        task = docker_dag.get_task(task_id)
        assert (task.retries, task.retry_delay, task.retry_exponential_backoff) == (1, dt.timedelta(seconds=60), 0)
    # Slack unreachable (exit 3) is retried, as the issue asks (the design table's 0 predates it).
    notify = docker_dag.get_task("notify")
    assert (notify.retries, notify.retry_delay, notify.retry_exponential_backoff) == (
        3, dt.timedelta(seconds=60), 2.0,
    )  # fmt: skip
    assert notify.max_retry_delay == dt.timedelta(seconds=300)


def test_notify_runs_whatever_happened_and_the_outcome_task_judges_the_run(docker_dag):
    notify, outcome = docker_dag.get_task("notify"), docker_dag.get_task("outcome")
    assert notify.trigger_rule == outcome.trigger_rule == "all_done"
    # Teardowns, so a failed pipeline, or a run an operator marked failed, still gets its report. outcome, not
    # notify, fails the run: a teardown with on_failure_fail_dagrun hides its upstream tasks from the run's state.
    assert notify.is_teardown and not notify.on_failure_fail_dagrun
    assert outcome.is_teardown and outcome.on_failure_fail_dagrun and outcome.retries == 0
    assert notify.secrets == ("s3", "slack")
    # The data source's token comes from a connection (the "source" set), never from the source param.
    assert docker_dag.get_task("ingest").secrets == ("s3", "source")
    assert all(docker_dag.get_task(t).secrets == ("s3",) for t in STAGES if t not in ("notify", "ingest"))


@pytest.mark.parametrize(
    ("states", "run_state"),
    [
        ({}, "success"),
        # A stage failed: the tasks after it are upstream_failed, notify and outcome succeed. Before issue 22,
        # notify's on_failure_fail_dagrun made it the only leaf, and the scheduler called this run a success.
        ({"validate": "failed", "**": "upstream_failed", "notify": "success", "outcome": "success"}, "failed"),
        # Nothing new: training skipped, approval skipped.
        ({"train": "skipped", "train_baseline": "skipped", "evaluate": "skipped", "approval_needed": "skipped",
          "approve": "skipped", "promote": "skipped"}, "success"),
        # Notify failed after its retries (Slack down), or an operator marked the run failed: outcome fails.
        ({"notify": "failed", "outcome": "failed"}, "failed"),
        ({"ingest": "skipped", "**": "skipped", "notify": "success", "outcome": "failed"}, "failed"),
    ],
)  # fmt: skip
def test_the_run_state_the_scheduler_derives_from_the_tasks(docker_dag, states, run_state):
    """Airflow's own rule (DagRun._tis_for_dagrun_state: the leaf tasks, teardowns counted only with
    on_failure_fail_dagrun) applied to the serialized DAG, as the scheduler applies it. `airflow dags test`
    decides differently, so the end-to-end tests alone did not see a failed run end green."""
    from collections import namedtuple

    from airflow.models.dagrun import DagRun
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import State

    dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(docker_dag))
    rest = states.get("**", "success")
    ti = namedtuple("TaskInstance", "task_id state")
    tis = [ti(t, states.get(t, rest)) for t in dag.task_ids]
    leaves = DagRun._tis_for_dagrun_state(None, dag=dag, tis=tis)
    assert {ti.task_id for ti in leaves} == {"promote", "outcome"}
    if any(ti.state in State.failed_states for ti in leaves):
        derived = "failed"
    else:
        derived = "success" if all(ti.state in State.success_states for ti in leaves) else "running"
    assert derived == run_state


def test_docker_mode_images_and_container_settings(docker_dag):
    from dermaops_runner.docker_mode import DockerStageOperator

    for task_id in STAGES:
        task = docker_dag.get_task(task_id)
        assert isinstance(task, DockerStageOperator)
        assert task.image.startswith("dermaops-torch:" if task_id in TORCH_STAGES else "dermaops-data:")
        assert task.command[:4] == ["python", "-m", "dermaops", task_id]
        assert task.auto_remove == "force" and task.mount_tmp_dir is False
        assert task.container_name is None
        assert task.network_mode == "host"
        assert task.device_requests is None  # no GPU unless DERMAOPS_GPU=1
        assert task._private_environment == {}  # secrets are resolved at execute time only
        assert (task.shm_size is not None) == (task_id in TORCH_STAGES)


def test_gpu_images_and_network_come_from_the_environment(airflow_config, monkeypatch):
    dag = parse(
        monkeypatch,
        DERMAOPS_RUNNER="docker",
        DERMAOPS_GPU="1",
        DERMAOPS_DATA_IMAGE="registry.example/dermaops-data:7",
        DERMAOPS_TORCH_IMAGE="registry.example/dermaops-torch:7",
        DERMAOPS_DOCKER_NETWORK="dermaops_default",
    )
    for task_id in STAGES:
        task = dag.get_task(task_id)
        gpu = task_id in TORCH_STAGES
        assert task.image == f"registry.example/dermaops-{'torch' if gpu else 'data'}:7"
        assert task.network_mode == "dermaops_default"
        if gpu:
            [request] = task.device_requests
            assert request.capabilities == [["gpu"]] and request.count == -1  # every GPU of the host
            # train runs a process per GPU, their DataLoader workers passing batches through /dev/shm
            assert task.shm_size == (16 if task_id == "train" else 2) * 1024**3
        else:
            assert task.device_requests is None


def test_local_mode_runs_the_same_argv(airflow_config, monkeypatch, docker_dag):
    from dermaops_runner.local_mode import LocalStageOperator

    local_dag = parse(monkeypatch, DERMAOPS_RUNNER="local")
    for task_id in STAGES:
        task = local_dag.get_task(task_id)
        assert isinstance(task, LocalStageOperator)
        assert ["python", "-m", "dermaops", task_id, *task.argv] == docker_dag.get_task(task_id).command


def test_unknown_runner_mode_is_an_import_error_naming_it(airflow_config, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("DERMAOPS_RUNNER", "nomad")
    bag = DagBag(dag_folder=ROOT / "dags")
    errors = bag.import_errors
    assert {Path(f).name for f in errors} == {"ham10000_retrain.py", "ham10000_predict.py"}  # every DAG file
    assert all("DERMAOPS_RUNNER='nomad'" in e and "docker, local, kubernetes" in e for e in errors.values())


def test_params_are_typed_described_and_bounded(docker_dag):
    from airflow.sdk.exceptions import ParamValidationError

    params = docker_dag.params
    expected = {"source", "epochs", "finetune_epochs", "batch_size", "lr", "finetune_lr", "image_size", "arch"}
    expected |= {"pretrained", "force_ingest", "force_retrain", "seed", "promotion_margin", "mel_recall_floor"}
    assert expected <= set(params.keys())
    for name in params.keys():
        param = params.get_param(name)
        schema = param.schema
        assert param.description and schema.get("title"), name
        assert "type" in schema or "enum" in schema, name
        types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
        if {"integer", "number"} & set(types):
            # Bounds under allOf: a top-level minimum/maximum makes the form's number input clamp silently.
            assert "minimum" not in schema and "maximum" not in schema, name
            [bounds] = schema["allOf"]
            assert "maximum" in bounds or "exclusiveMaximum" in bounds, name
            assert "minimum" in bounds or "exclusiveMinimum" in bounds, name
            assert "Allowed:" in param.description, name
    # The form marks a param required unless its type includes null: never the on/off switches.
    for switch in ("force_ingest", "force_retrain"):
        assert "null" in params.get_param(switch).schema["type"]
    assert params.get_param("arch").schema["enum"][:3] == ["resnet18", "resnet34", "resnet50"]
    params.validate()  # the defaults are valid
    for name, bad in (("epochs", -1), ("arch", "vgg16"), ("lr", 0), ("mel_recall_floor", 1.5), ("recipe", "x")):
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(bad)


def test_dag_survives_serialization(docker_dag):
    """The scheduler and API server only see the serialized DAG."""
    from airflow.serialization.serialized_objects import DagSerialization

    restored = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(docker_dag))
    assert set(restored.task_ids) == {*STAGES, *NON_STAGES}
    assert restored.get_task("notify").is_teardown and not restored.get_task("notify").on_failure_fail_dagrun
    assert restored.get_task("outcome").is_teardown and restored.get_task("outcome").on_failure_fail_dagrun
    assert [a.uri for a in restored.get_task("ingest").outlets] == ["s3://lesions/datasets/ham10000"]
    for task_id in ("evaluate", "promote"):  # both may write champion.json
        assert [a.uri for a in restored.get_task(task_id).outlets] == ["s3://lesions/registry/ham10000/champion.json"]
    assert restored.get_task("approve").task_type == "HITLOperator"


def test_a_source_param_with_a_credential_is_refused_when_the_run_is_triggered(docker_dag):
    """The API server validates a trigger's conf against the serialized DAG's params before it stores the
    run (SerializedDAG.create_dagrun: params.deep_merge(conf).validate()): a credential in the source URL
    never reaches the stored conf, and the refusal says where the token goes instead."""
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization
    from dermaops.config import SOURCE_CONNECTION
    from dermaops.redaction import SOURCE_TOKEN_ENV

    params = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(docker_dag)).params
    for source in (
        "http://127.0.0.1:9/plain/small?key=DV-TOKEN-555",  # Dataverse's own way to pass an API token
        "https://dataverse.example/dataset.xhtml?persistentId=doi:10.5072/FK2/X&key=DV-TOKEN-555",
        "https://host/ham?api_key=K",
        "https://host/ham?APIKEY=K",
        "https://host/ham?x=1&token=T",
        "https://host/ham?access_token=T",
        "https://reader:pw@host/ham",
        "https://tok3n@host/ham",
    ):
        with pytest.raises(ParamValidationError) as refused:
            params.deep_merge({"source": source}).validate()
        assert "Invalid input for param source" in str(refused.value), source
        assert SOURCE_CONNECTION in str(refused.value) and SOURCE_TOKEN_ENV in str(refused.value), source
    for source in (
        "https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T",
        "doi:10.7910/DVN/DBW86T",
        "https://host/ham?monkey=1",
        "s3://lesions/sources/ham10000-28px",
        "/data/ham10000",
    ):
        assert params.deep_merge({"source": source}).validate()["source"] == source


def test_a_blank_source_is_the_deployments_and_a_typed_one_overrides_it(docker_dag, monkeypatch):
    """The source belongs to the deployment (the Airflow Variable dermaops_source, which scripts/stack seed
    sets; here through its AIRFLOW_VAR_ form): the form's blank source, the scheduled runs' too, ingests it;
    unset, Harvard Dataverse. Read when ingest's argv is rendered, never at parse time (parse() forbids it)."""
    from airflow.serialization.serialized_objects import DagSerialization
    from dermaops.config import DATAVERSE_SOURCE, SOURCE_VARIABLE
    from dermaops_runner.templating import source

    params = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(docker_dag)).params
    assert params.validate()["source"] is None  # the default: blank, and it passes the credential rule
    assert "dermaops_source(params)" in docker_dag.get_task("ingest").command[5]

    monkeypatch.undo()  # parsing is over: the macro runs at execute time, where Variables are read
    variable = f"AIRFLOW_VAR_{SOURCE_VARIABLE.upper()}"
    monkeypatch.delenv(variable, raising=False)
    assert source({"source": None}) == DATAVERSE_SOURCE
    monkeypatch.setenv(variable, "s3://lesions/sources/ham10000-200px")
    assert source({"source": None}) == source({"source": ""}) == "s3://lesions/sources/ham10000-200px"
    assert source({"source": "/data/other-pack"}) == "/data/other-pack"  # typed in the form: this run only
    monkeypatch.setenv(variable, "https://reader:pw@host/ham")
    with pytest.raises(ValueError, match=f"^the Airflow Variable {SOURCE_VARIABLE}: the source URL must carry no"):
        source({"source": None})


def test_scripts_run_lists_the_tasks_in_the_dags_order(airflow_config):
    """devrun's outcome table (scripts/run): upstream before downstream, ties as the DAG file defines them."""
    from dermaops.devrun import dag_order

    assert dag_order("dermaops_ham10000") == [
        "ingest", "validate", "split", "changes", "retrain_needed", "train_baseline", "train", "evaluate",
        "approval_needed", "approve", "promote", "notify", "outcome",
    ]  # fmt: skip


def test_summary_is_found_even_when_a_stderr_line_follows_it():
    """Docker interleaves stdout and stderr: the summary is the last JSON line naming the stage."""
    from dermaops_runner.results import summary_from_lines

    lines = [
        "INFO starting",
        '{"stage": "split", "status": "done", "split_uri": "s3://b/runs/r/split"}',
        "WARNING late",
    ]
    assert summary_from_lines("split", lines)["split_uri"] == "s3://b/runs/r/split"
    with pytest.raises(ValueError, match="no JSON summary"):
        summary_from_lines("split", ["INFO starting", '{"stage": "ingest"}'])


def test_run_key_is_one_safe_s3_segment():
    from dermaops_runner.templating import run_key

    assert run_key("manual__2026-01-05T10:00:00.123+00:00") == "manual__2026-01-05T10-00-00.123-00-00"
    assert run_key("scheduled__2026-01-05T03:00:00+00:00").count("/") == 0


def test_plugins_folder_holds_no_module_that_shadows_a_library():
    """Airflow's plugin loader imports plugin files as top-level modules unless .airflowignore'd."""
    ignore = (ROOT / "plugins" / ".airflowignore").read_text()
    assert "dermaops_runner/" in ignore.splitlines()
    names = {p.stem for p in Path(ROOT / "plugins" / "dermaops_runner").glob("*.py")}
    assert not names & {"docker", "secrets", "logging", "json", "local", "types"}


def _render_argv(dag, task_id: str, params: dict) -> list[str]:
    """A task's argv items rendered as the worker renders them (the DAG's macros, these params), the
    run-time XCom/run-id items replaced by placeholders; empty items dropped as the runner drops them."""
    from dermaops_runner.templating import MACROS

    env = dag.get_template_env()
    task = dag.get_task(task_id)
    argv = task.command[4:] if hasattr(task, "command") else task.argv
    out = []
    for item in argv:
        if "ti." in item or "run_id" in item or "dag_run" in item:
            item = "s3://b/runs/r/x" if "s3://" in item or "xcom" in item else "run"
        rendered = env.from_string(item).render(params=params, **MACROS)
        if rendered:
            out.append(rendered)
    return out


def test_trigger_params_reach_the_stages_as_their_typed_config(docker_dag):
    """Form params -> rendered argv -> the stage's own parser and checks: a blank param takes the recipe's
    value, a typed one overrides it, and the stage ends up with exactly those settings."""
    from dermaops.cli import build_parser
    from dermaops.config import RECIPES

    parser, mods = build_parser()
    defaults = {name: docker_dag.params.get_param(name).value for name in docker_dag.params.keys()}
    for recipe, values in RECIPES.items():
        params = {**defaults, "recipe": recipe, "epochs": 7, "ema_decay": 0.99}
        args = parser.parse_args(["train", *_render_argv(docker_dag, "train", params)])
        cfg = mods["train"].CONFIG.from_args(args)
        assert cfg.epochs == 7 and cfg.ema_decay == 0.99  # typed in: overrides the recipe
        for name in ("arch", "image_size", "finetune_epochs", "batch_size", "lr", "finetune_lr", "label_smoothing"):
            assert getattr(cfg, name) == values[name], (recipe, name)
        assert cfg.max_train_images is None and cfg.seed == 42
        args = parser.parse_args(["train_baseline", *_render_argv(docker_dag, "train_baseline", params)])
        baseline = mods["train_baseline"].CONFIG.from_args(args)
        # One image size for both models, so they share one decoded-image cache.
        assert (baseline.n_estimators, baseline.image_size) == (values["baseline_trees"], values["image_size"])
    args = parser.parse_args(["evaluate", *_render_argv(docker_dag, "evaluate", {**defaults, "mel_recall_floor": 0.6})])
    assert mods["evaluate"].CONFIG.from_args(args).mel_recall_floor == 0.6
    # One recipe, rendered alike for the check that compares it and for evaluate that records it.
    from dermaops.config import recipe_values

    params = {**defaults, "recipe": "full-gpu", "epochs": 9}
    changes = parser.parse_args(["changes", *_render_argv(docker_dag, "changes", params)])
    recorded = parser.parse_args(["evaluate", *_render_argv(docker_dag, "evaluate", params)])
    assert changes.recipe == recorded.recipe == recipe_values(params)
    assert (changes.recipe["epochs"], changes.recipe["arch"], changes.force) == (9, RECIPES["full-gpu"]["arch"], False)
    forced = parser.parse_args(["changes", *_render_argv(docker_dag, "changes", {**params, "force_retrain": True})])
    assert forced.force is True


def test_unpausing_and_recipes_are_explained_where_the_user_triggers(docker_dag):
    assert docker_dag.params.get_param("recipe").value == "quick-cpu"
    assert "unpausing the DAG starts a run for the latest" in docker_dag.doc_md
    epochs = docker_dag.params.get_param("epochs").description
    assert "frozen backbone" in epochs and "whole network" in epochs  # both cases, not just one


class _AnsweredApproval:
    """The run-time side of the templates: what `ti.xcom_pull` returns on the worker (XComs of this run)."""

    def __init__(self, xcoms: dict):
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        return self.xcoms.get(task_ids)


def test_require_approval_and_the_reviewers_answer_reach_the_stages(docker_dag):
    """require_approval becomes evaluate's --require-approval; the HITL task's XCom (the reviewer's answer)
    becomes promote's flags, parsed by promote's own parser; no answer renders a flag promote refuses."""
    import datetime as dt

    from dermaops.cli import build_parser
    from dermaops_runner.approval import approval_needed
    from dermaops_runner.templating import MACROS

    parser, _ = build_parser()
    defaults = {name: docker_dag.params.get_param(name).value for name in docker_dag.params.keys()}
    assert defaults["require_approval"] is False
    off = parser.parse_args(["evaluate", *_render_argv(docker_dag, "evaluate", defaults)])
    on = parser.parse_args(["evaluate", *_render_argv(docker_dag, "evaluate", {**defaults, "require_approval": True})])
    assert (off.require_approval, on.require_approval) == (False, True)

    env = docker_dag.get_template_env()
    promote = docker_dag.get_task("promote")
    answer = {
        "chosen_options": ["Reject"],
        "params_input": {"comment": "melanoma recall  too low\nfor the clinic"},
        "responded_at": dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC),
        "responded_by_user": {"id": "7", "name": "dr.lee"},
    }
    ti = _AnsweredApproval({"approve": answer, "evaluate": {"decision": "awaiting_approval"}})
    argv = [env.from_string(item).render(ti=ti, run_id="manual__r", **MACROS) for item in promote.command[4:]]
    args = parser.parse_args(["promote", *argv])
    assert (args.decision, args.reviewer, args.comment) == (
        "reject",
        "dr.lee",
        "melanoma recall too low for the clinic",
    )
    assert (args.run_id, args.registry, args.responded_at) == ("manual__r", "s3://lesions/registry/ham10000",
                                                               "2026-03-02T09:30:00+00:00")  # fmt: skip
    assert approval_needed(ti) is True
    assert approval_needed(_AnsweredApproval({"evaluate": {"decision": "promoted"}})) is False
    # No answer (the approval task did not answer): "--decision=" renders, and promote's parser names it.
    empty = [
        env.from_string(item).render(ti=_AnsweredApproval({}), run_id="r", **MACROS) for item in promote.command[4:]
    ]
    assert "--decision=" in empty
    with pytest.raises(SystemExit):
        parser.parse_args(["promote", *empty])
    assert args.timed_out == "no"  # dr.lee answered
    # The response timeout passed: Airflow's answer is the default with no responding user.
    timeout = {**answer, "chosen_options": ["Reject"], "params_input": {}, "responded_by_user": None}
    ti = _AnsweredApproval({"approve": timeout, "evaluate": {"decision": "awaiting_approval"}})
    args = parser.parse_args(
        ["promote", *(env.from_string(item).render(ti=ti, run_id="r", **MACROS) for item in promote.command[4:])]
    )
    assert (args.decision, args.reviewer, args.comment, args.timed_out) == ("reject", "", "", "yes")


def test_the_approval_timeout_is_a_deployment_setting_checked_at_parse_time():
    from dermaops_runner.approval import TIMEOUT_ENV, response_timeout

    assert response_timeout({}) == dt.timedelta(days=6)
    assert response_timeout({TIMEOUT_ENV: " 0.5 "}) == dt.timedelta(minutes=30)
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=f"DERMAOPS_APPROVAL_TIMEOUT_HOURS='{bad}' is not a number of hours > 0"):
            response_timeout({TIMEOUT_ENV: bad})
