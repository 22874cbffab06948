"""The fast tier: settings defined once and everything derived from them, the stage registry, the
one-way import rule. Pure functions and the stages' own CLI in-process; no training, no Airflow."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys

import pytest
from dermaops import cli
from dermaops.config import (
    CONFIGS,
    RECIPES,
    RUN_PARAMS,
    BaselineConfig,
    EvaluateConfig,
    TrainConfig,
    argv_item,
    dag_argv,
    param_names,
    param_schema,
    param_settings,
    resolve,
)
from dermaops.pipeline import PIPELINE, STAGES, run_key
from dermaops.stage import MANIFEST

from tests.support.airflow_env import ROOT

PACKAGE = ROOT / "tasks" / "dermaops"


def _settings(cls):
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


# -- settings ---------------------------------------------------------------------------------------------
def test_every_setting_has_help_and_a_default_within_its_bounds():
    for stage, cls in CONFIGS.items():
        defaults = cls()  # every field has a default: a bare stage command is a valid one
        for f, spec in _settings(cls):
            assert spec.help, (stage, f.name)
            value = getattr(defaults, f.name)
            if spec.choices:
                assert value in spec.choices, (stage, f.name)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                assert spec.lo is None or value >= spec.lo, (stage, f.name)
                assert spec.hi is None or value <= spec.hi, (stage, f.name)


def test_recipes_cover_the_same_params_and_every_value_passes_the_stage_checks():
    [keys] = {frozenset(values) for values in RECIPES.values()}
    owners = param_settings()
    assert keys <= set(owners), keys - set(owners)
    parser, mods = cli.build_parser()
    for recipe in RECIPES:
        for stage in ("train", "train_baseline"):
            argv = [argv_item(f"--{f.name.replace('_', '-')}", resolve({"recipe": recipe}, _param(f, spec)))
                    for f, spec in _settings(CONFIGS[stage]) if spec.param]  # fmt: skip
            args = parser.parse_args([stage, "--split", "s3://b/s", "--out", "s3://b/o", *filter(None, argv)])
            mods[stage].CONFIG.from_args(args)  # raises on any value out of bounds


def _param(f, spec) -> str:
    return f.name if spec.param is True else spec.param


def test_a_param_shared_by_stages_is_accepted_by_each_of_them():
    """seed and image_size (numbers), tta (a switch), geometry (a choice): the form's bounds come from one
    field; every other stage reading the param must accept every value the form accepts."""
    owners = param_settings()
    for cls in CONFIGS.values():
        for f, spec in _settings(cls):
            if spec.param and not spec.owner:
                _, owner_field, owner, _, _ = owners[_param(f, spec)]
                if f.type == "bool":
                    assert owner_field.type == "bool", f.name
                elif spec.choices:
                    assert set(owner.param_choices or owner.choices) <= set(spec.choices), f.name
                else:
                    assert spec.lo is not None and owner.lo >= spec.lo and owner.hi <= spec.hi, f.name


def test_the_train_fingerprint_keeps_its_inputs_and_a_new_setting_at_its_default_changes_nothing():
    legacy = set(
        "arch pretrained image_size stem epochs finetune_epochs finetune_depth batch_size lr finetune_lr weight_decay "
        "label_smoothing class_weights class_weight_power augment patience seed max_train_images calibrate".split()
    )
    assert set(TrainConfig().fingerprint_inputs()) == legacy  # no device, threads; no ema_decay while off
    assert TrainConfig(ema_decay=0.999).fingerprint_inputs()["ema_decay"] == 0.999
    assert TrainConfig(mixup_alpha=0.2).fingerprint_inputs()["mixup_alpha"] == 0.2
    assert set(BaselineConfig().fingerprint_inputs()) == {
        "class_weight", "n_estimators", "max_depth", "min_samples_leaf", "image_size", "seed"
    }  # fmt: skip
    # The promotion floors and overrides change the decision evaluate publishes: they are inputs.
    gate = {"min_macro_f1", "min_macro_auc", "allow_subset_promotion", "allow_broken_champion_override"}
    assert {"margin", "floor", "primary_metric", "gradcam_images", "tta"} | gate == set(
        EvaluateConfig().fingerprint_inputs()
    )


# -- the checks, before any work or deletion (issue 8, bug 2) ----------------------------------------------
BAD_FLOATS = [
    ("train", "--weight-decay", "nan", "--weight-decay must be a finite number, got nan"),
    ("train", "--lr", "inf", "--lr must be a finite number, got inf"),
    ("train", "--label-smoothing", "-inf", "--label-smoothing must be a finite number, got -inf"),
    ("train", "--lr", "0", "--lr must be > 0 and <= 1, got 0.0"),
    ("train", "--lr", "1e30", "--lr must be > 0 and <= 1, got 1e+30"),  # the README's "train --lr 1e30" fault
    ("train", "--class-weight-power", "2.5", "--class-weight-power must be 0..2, got 2.5"),
    ("train", "--ema-decay", "1", "--ema-decay must be >= 0 and < 1, got 1.0"),
    ("train", "--finetune-lr", "nan", "--finetune-lr must be a finite number, got nan"),
    ("evaluate", "--promotion-margin", "nan", "--promotion-margin must be a finite number, got nan"),
    ("evaluate", "--mel-recall-floor", "inf", "--mel-recall-floor must be a finite number, got inf"),
    ("evaluate", "--mel-recall-floor", "1.5", "--mel-recall-floor must be 0..1, got 1.5"),
    ("train_baseline", "--n-estimators", "0", "--n-estimators must be 1..5000, got 0"),
    ("split", "--seed", "-1", "--seed must be 0..4294967295, got -1"),
    ("split", "--fractions", "nan,0.5,0.5", "--fractions: every fraction must be > 0, got 'nan,0.5,0.5'"),
    ("validate", "--max-missing-age-fraction", "nan", "--max-missing-age-fraction must be a finite number, got nan"),
    ("validate", "--min-lesions-per-class", "0", "--min-lesions-per-class must be 1..1000000, got 0"),
    ("validate", "--min-rows", "0", "--min-rows must be 1..10000000, got 0"),
]


@pytest.mark.parametrize(("stage", "flag", "value", "message"), BAD_FLOATS)
def test_bad_numbers_exit_2_with_one_line_and_the_finished_output_survives(
    stage, flag, value, message, bucket, store, capsys
):
    out = bucket.join("runs", "r1", stage)
    finished = {"stage": stage, "fingerprint": "f" * 64, "files": {}, "summary": {"done": True}}
    store.put_json(out.join(MANIFEST), finished)
    inputs = {
        "train": ["--split", str(bucket.join("split")), "--force"],
        "train_baseline": ["--split", str(bucket.join("split")), "--force"],
        "evaluate": ["--split", str(bucket.join("split")), "--model", str(bucket.join("cnn")), "--force"],
        "split": ["--dataset", str(bucket.join("datasets", "v1")), "--force"],
        "validate": ["--dataset", str(bucket.join("datasets", "v1")), "--force"],
    }[stage]
    code = cli.main([stage, *inputs, "--out", str(out), f"{flag}={value}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == [f"dermaops {stage}: error: {message}"]
    assert store.get_json(out.join(MANIFEST)) == finished  # --force did not get to delete anything
    assert [uri.key for uri, _ in store.list(bucket)] == [out.join(MANIFEST).key]


BAD_INGEST_SETTINGS = [
    ("--timeout=nan", "--timeout must be a finite number, got nan"),
    ("--timeout=0", "--timeout must be > 0 and <= 3600, got 0.0"),
    ("--retry-base-delay=-inf", "--retry-base-delay must be a finite number, got -inf"),
    ("--progress-every=inf", "--progress-every must be a finite number, got inf"),
    ("--retries=-1", "--retries must be 0..100, got -1"),
    ("--retry-base-delay=90", "need --retry-base-delay <= --retry-max-delay (got 90.0 and 60.0)"),
]


@pytest.mark.parametrize(("argument", "message"), BAD_INGEST_SETTINGS)
def test_ingest_settings_are_checked_from_its_config_before_anything_is_fetched(
    argument, message, bucket, store, capsys
):
    datasets = bucket.join("datasets", "ham10000")
    kept = store.put_json(datasets.join("v1", "manifest.json"), {"kept": True})
    # A source that would fail to connect: the check comes first.
    code = cli.main(["ingest", "--source", "http://127.0.0.1:9/pack", "--datasets", str(datasets), argument])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == [f"dermaops ingest: error: {message}"]
    assert [uri for uri, _ in store.list(bucket)] == [kept]


def test_cross_setting_rule_is_checked_with_the_others(capsys):
    assert (
        cli.main(["train", "--split", "s3://b/s", "--out", "s3://b/o", "--epochs", "0", "--finetune-epochs", "0"]) == 2
    )
    assert "both 0: nothing to train" in capsys.readouterr().err


# -- the DAG's params and argv, derived -----------------------------------------------------------------
def test_every_form_param_has_a_title_bounds_in_words_and_recipe_params_default_to_blank():
    names = param_names()
    kept = "source epochs finetune_epochs image_size max_train_images arch batch_size lr pretrained seed"
    assert set(kept.split()) | {"force_ingest", "force_retrain", "recipe"} <= set(names)
    assert len(names) == len(set(names))
    for name in names:
        schema = param_schema(name)
        assert schema["title"] and schema["description"], name
        json.dumps(schema)  # serialisable as a Param
        if name in RECIPES["quick-cpu"]:
            assert schema["default"] is None and "Blank: the recipe's value" in schema["description"], name
    assert param_schema("lr")["allOf"] == [{"exclusiveMinimum": 0, "maximum": 1}]
    assert "> 0 and <= 1" in param_schema("lr")["title"]
    assert RUN_PARAMS["force_ingest"]["type"] == ["boolean", "null"]


def test_argv_items_and_recipe_resolution():
    assert argv_item("--lr", 0.003) == "--lr=0.003"
    assert argv_item("--max-train-images", None) == ""  # dropped: the stage keeps its default
    assert argv_item("--tta", False) == "--no-tta"
    assert resolve({"recipe": "full-gpu", "epochs": None}, "epochs") == RECIPES["full-gpu"]["epochs"]
    assert resolve({"recipe": "full-gpu", "epochs": 2}, "epochs") == 2
    assert resolve({"epochs": None}, "epochs") == RECIPES["quick-cpu"]["epochs"]
    assert resolve({"seed": 7}, "seed") == 7
    with pytest.raises(ValueError, match="recipe 'tiny'"):
        resolve({"recipe": "tiny"}, "epochs")
    assert "{{ dermaops_arg(params, 'baseline_trees', '--n-estimators') }}" in dag_argv("train_baseline")
    assert "{{ dermaops_arg(params, 'split_strategy', '--strategy') }}" in dag_argv("split")


# -- the stage registry ---------------------------------------------------------------------------------
def test_the_registry_is_the_stage_list_everyone_uses():
    assert list(cli.STAGES) == [s.name for s in STAGES]
    assert PIPELINE == tuple(s.name for s in STAGES if s.dag == "retrain" and s.name != "notify")
    assert {s.name for s in STAGES if s.gpu} == {"train", "evaluate", "predict"}
    assert {s.name: s.secrets for s in STAGES if s.secrets != ("s3",)} == {
        "ingest": ("s3", "source"),
        "notify": ("s3", "slack"),
        "predict": ("s3", "slack"),
    }
    assert set(CONFIGS) <= set(cli.STAGES)
    assert run_key("manual__2026-01-05T10:00:00+00:00") == "manual__2026-01-05T10-00-00-00-00"


# -- dependencies point one way -------------------------------------------------------------------------
def _dermaops_imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "dermaops" or n.startswith("dermaops.")}


def test_stages_import_library_modules_and_library_modules_never_import_stages():
    stage_modules = {s.module for s in STAGES}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "dermaops." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        imported = {n for n in _dermaops_imports(path) if n.startswith("dermaops.stages")}
        allowed = set()
        if module == "dermaops.stages.__init__":
            allowed = imported
        offenders += [f"{module} imports {n}" for n in imported - allowed if n != module]
    assert offenders == [], "stages import library modules only; library modules never import stages"
    assert stage_modules == {f"dermaops.stages.{p.stem}" for p in (PACKAGE / "stages").glob("[!_]*.py")}


def _module_graph() -> dict[str, set[str]]:
    """dermaops module -> the dermaops modules it imports anywhere (at the top or inside a function: a deferred
    import still makes the two modules depend on each other)."""
    modules = {
        "dermaops." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted(PACKAGE.rglob("*.py"))
    }
    graph = {}
    for module, path in modules.items():
        # "from dermaops.x import name" names a module when x.name is one, else x.
        graph[module] = {n for n in _dermaops_imports(path) if n in modules and n != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_package_imports_itself_round_a_cycle():
    graph = _module_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The check itself: a cycle put into the real graph (sources.base importing the package that imports it).
    injected = {**graph, "dermaops.sources.base": graph["dermaops.sources.base"] | {"dermaops.sources"}}
    assert find_cycle(injected) == ["dermaops.sources", "dermaops.sources.base", "dermaops.sources"]


def test_the_modules_the_dag_parses_with_import_nothing_heavy():
    """dermaops.config and dermaops.pipeline are imported by the DAG file and the plugin at parse time."""
    code = (
        "import sys, dermaops.config, dermaops.pipeline, dermaops.errors\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numpy', 'pandas', 'sklearn', 'great_expectations', 'boto3', 'matplotlib'))\n"
        "print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_no_code_points_readers_at_design_files_a_clone_lacks():
    for path in [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("plugins/**/*.py"), *ROOT.glob("dags/*.py")]:
        text = path.read_text()
        assert "DESIGN.md" not in text and "MODEL_SEAMS.md" not in text, path
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_scripts_run_asks_the_dag_for_a_recipe_by_name():
    from dermaops.devrun import conf

    assert conf("full-gpu", "/data/pack", '{"seed": 7}') == {"recipe": "full-gpu", "source": "/data/pack", "seed": 7}
    assert conf("quick-cpu", "", "{}") == {"recipe": "quick-cpu"}
    with pytest.raises(SystemExit, match="not valid JSON"):
        conf("quick-cpu", None, "{")
    with pytest.raises(SystemExit, match="unknown recipe 'tiny'"):
        conf("tiny", None, "{}")


def test_the_architecture_module_map_names_every_module_and_stage():
    """docs/architecture.md's module map stays true: every library module of the package and every stage of
    the registry is named there (a new module without its line fails here)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Module map", 1)[1]
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))
    missing = [m for m in modules if f"`{m}.py`" not in section]
    assert not missing, f"modules missing from docs/architecture.md's module map: {missing}"
    stages = section.split("Library (", 1)[0]
    assert not [s.name for s in STAGES if f"`{s.name}`" not in stages], stages


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--min-rows=50", "--max-rows=10"), "need --min-rows <= --max-rows (got 50 and 10)"),
        (
            ("--min-image-side=900", "--max-image-side=600"),
            "need --min-image-side <= --max-image-side (got 900 and 600)",
        ),
        (
            ("--min-lesion-share=0.5", "--max-lesion-share=0.2"),
            "need --min-lesion-share <= --max-lesion-share (got 0.5 and 0.2)",
        ),
    ],
)
def test_validates_rules_across_settings_are_its_configs(flags, message, bucket, capsys):
    """ValidateConfig.check: a pair of bounds the wrong way round is one line, exit 2, before any work."""
    code = cli.main(
        ["validate", "--dataset", str(bucket.join("datasets", "v1")), "--out", str(bucket.join("v")), *flags]
    )
    assert code == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.strip()] == [
        f"dermaops validate: error: {message}"
    ]


# -- a stage declares only where it reads and writes; its settings are its config's ------------------------
# Inputs and outputs: the prefixes and files a stage reads and writes, and the facts Airflow hands it about
# the run (its id, the task states, the reviewer's answer). Anything else is a setting, with bounds, a check
# and a fingerprint: it belongs in the stage's config class (dermaops.config).
LOCATION_FLAGS = {
    "--source", "--datasets", "--dataset", "--out", "--expectations", "--drift-registry", "--official-splits",
    "--split", "--model", "--baseline", "--registry", "--recipe", "--run-id", "--images", "--report-out",
    "--channel", "--dag-id", "--states", "--results", "--started-at", "--marked-failed",
    "--decision", "--reviewer", "--comment", "--responded-at", "--timed-out",
}  # fmt: skip


def hand_written_flags(source: str) -> list[str]:
    """The flags a module's add_arguments declares itself (parser.add_argument("--x", ...))."""
    flags = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "add_arguments":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument":
                    names = [a.value for a in call.args if isinstance(a, ast.Constant)]
                    flags += [name for name in names if str(name).startswith("-")]
    return flags


def test_a_stage_declares_only_its_inputs_and_outputs_and_its_settings_come_from_its_config():
    import importlib.util

    injected = (
        'def add_arguments(parser):\n    parser.add_argument("--out")\n    parser.add_argument("--retries", type=int)\n'
    )
    assert set(hand_written_flags(injected)) - LOCATION_FLAGS == {"--retries"}  # what the check catches
    for stage in STAGES:
        source = open(importlib.util.find_spec(stage.module).origin).read()
        own = hand_written_flags(source)
        assert own, f"{stage.name}: no add_arguments found"
        settings = set(CONFIGS[stage.name].__dataclass_fields__) if stage.name in CONFIGS else set()
        assert not set(own) - LOCATION_FLAGS, (
            f"{stage.name} declares {sorted(set(own) - LOCATION_FLAGS)} by hand: a setting belongs in its config class"
        )
        assert not {flag.removeprefix("--").replace("-", "_") for flag in own} & settings, stage.name


# -- a stage gets typed IO and its config, never the parsed command line -----------------------------------
# cli.py parses the flags once and hands each stage run(stage_io, cfg, ctx): its locations, --force and the
# command line (dermaops.stage.StageIO), its checked settings (CONFIG, or None) and the store (Context).
RUN_SIGNATURE = (("stage_io", "StageIO"), ("cfg", None), ("ctx", "Context"))


def namespace_uses(source: str) -> list[str]:
    """Where a stage module reaches for an argparse Namespace: any name or parameter `args` (`args.split`,
    `getattr(args, ...)`), any `Namespace`, or a module-level `run` that is not run(stage_io: StageIO, cfg, ctx:
    Context)."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in ("args", "Namespace"):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.arg) and node.arg == "args":
            found.append((node.lineno, "parameter args"))
        elif isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append((node.lineno, ast.unparse(node)))
    runs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run"]
    for node in runs:
        params = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        if node.args.vararg or node.args.kwarg or len(params) != len(RUN_SIGNATURE):
            found.append((node.lineno, f"run({ast.unparse(node.args)})"))
            continue
        for arg, (name, annotation) in zip(params, RUN_SIGNATURE, strict=True):
            if arg.arg != name or (annotation and (not arg.annotation or ast.unparse(arg.annotation) != annotation)):
                found.append((node.lineno, f"run({ast.unparse(node.args)})"))
                break
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_no_stage_reads_an_argparse_namespace():
    import importlib.util

    good = "def run(stage_io: StageIO, cfg: None, ctx: Context) -> dict:\n    return {'out': stage_io.out}\n"
    assert namespace_uses(good) == []
    injected = (  # what the check catches: the Namespace travelling beside the config again
        "def run(stage_io: StageIO, cfg: None, ctx: Context) -> dict:\n    return helper(args.split)\n"
        "def helper(args: argparse.Namespace):\n    return getattr(args, 'out')\n"
    )
    assert namespace_uses(injected) == [
        "line 2: args", "line 3: argparse.Namespace", "line 3: parameter args", "line 4: args"
    ]  # fmt: skip
    assert namespace_uses("def run(args, ctx) -> dict:\n    return {}\n") == [
        "line 1: parameter args", "line 1: run(args, ctx)"
    ]  # fmt: skip
    assert namespace_uses("def run(stage_io, cfg, ctx):\n    pass\n") == ["line 1: run(stage_io, cfg, ctx)"]
    offenders = {}
    for stage in STAGES:
        source = open(importlib.util.find_spec(stage.module).origin).read()
        assert [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "run"], stage.name
        if found := namespace_uses(source):
            offenders[stage.name] = found
    assert offenders == {}, "a stage's run takes (stage_io: StageIO, cfg, ctx: Context); it never sees the Namespace"


def test_the_cli_hands_each_stage_its_declared_locations_force_and_command_line(bucket, monkeypatch):
    import importlib

    from dermaops.stage import Context, StageIO

    seen = {}

    def fake_run(stage_io, cfg, ctx):
        seen.update(stage_io=stage_io, cfg=cfg, ctx=ctx)
        return {}

    split = importlib.import_module("dermaops.stages.split")
    monkeypatch.setattr(split, "run", fake_run)
    argv = ["split", "--dataset", str(bucket.join("d")), "--out", str(bucket.join("o")), "--force", "--seed", "7"]
    assert cli.main(argv) == 0
    assert seen["stage_io"] == StageIO(
        inputs={"dataset": str(bucket.join("d")), "official_splits": None},
        out=str(bucket.join("o")),
        force=True,
        argv=tuple(argv),
    )
    assert seen["cfg"] == split.CONFIG(seed=7) and isinstance(seen["ctx"], Context)
    with pytest.raises(TypeError):
        seen["stage_io"].inputs["dataset"] = "s3://elsewhere"  # read-only

    notify = importlib.import_module("dermaops.stages.notify")  # no CONFIG: cfg is None; no --out
    monkeypatch.setattr(notify, "run", fake_run)
    report = str(bucket.join("n"))
    assert cli.main(["notify", "--run-id", "r1", "--states", '{"ingest": "success"}', "--report-out", report]) == 0
    assert seen["cfg"] is None and seen["stage_io"].out is None and seen["stage_io"].force is False
    assert seen["stage_io"].inputs == {
        "run_id": "r1", "dag_id": "dermaops_ham10000", "states": {"ingest": "success"}, "results": {},
        "started_at": None, "marked_failed": None, "report_out": report, "channel": None,
    }  # fmt: skip
    # Every stage's locations are exactly the flags its add_arguments declares (the one list of them).
    parser, mods = cli.build_parser()
    for mod in mods.values():
        declared = hand_written_flags(open(mod.__file__).read())
        assert StageIO.locations(mod.add_arguments) == tuple(f.removeprefix("--").replace("-", "_") for f in declared)


# -- runs are read through Airflow's interfaces ------------------------------------------------------------
# Airflow's metadata tables are its own to change between releases (columns moved between 2 and 3, the
# asset tables were renamed from dataset_*): tests and tools read runs through its REST API or CLI
# (tests/support/airflow_env.py, dermaops.devrun), never with SQL.
AIRFLOW_TABLES = "|".join((
    "dag", "dag_run", "dag_version", "serialized_dag", "task_instance", "task_instance_history", "task_reschedule",
    "xcom", "asset", "asset_event", "asset_alias", "hitl_detail",
))  # fmt: skip
# The shapes of SQL, so that prose ("lines from log files") passes.
AIRFLOW_SQL = re.compile(
    rf"\bselect\b[\s\S]*?\b(?:from|join)\s+(?:{AIRFLOW_TABLES})\b|\binsert\s+into\s+(?:{AIRFLOW_TABLES})\b"
    rf"|\bupdate\s+(?:{AIRFLOW_TABLES})\s+set\b|\bdelete\s+from\s+(?:{AIRFLOW_TABLES})\b",
    re.I,
)


def airflow_table_reads(source: str) -> list[str]:
    """An `import sqlite3` and the string literals of `source` that are SQL on an Airflow table."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name == "sqlite3"]
        elif isinstance(node, ast.ImportFrom) and node.module == "sqlite3":
            found.append("from sqlite3 import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and AIRFLOW_SQL.search(node.value):
            found.append(node.value.strip()[:80])
    return found


def test_no_code_reads_airflows_tables():
    table = "task_instance"  # the injected query's table, apart: this file's own literals stay clean
    injected = f'import sqlite3\nq = "SELECT try_number FROM {table} WHERE run_id = ?"\n'
    assert airflow_table_reads(injected) == ["import sqlite3", f"SELECT try_number FROM {table} WHERE run_id = ?"]
    assert airflow_table_reads('msg = "select a run from the list of runs; update dag docs"\n') == []
    offenders = {
        str(path.relative_to(ROOT)): found
        for folder in ("tests", "tasks", "plugins", "dags", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (found := airflow_table_reads(path.read_text()))
    }
    assert offenders == {}, "read runs through Airflow's REST API or CLI (tests/support/airflow_env.py)"
