"""Great Expectations (Core 1.x) suites kept as JSON files, run on in-memory pandas tables.

Each suite file in the expectations directory is a GX 1.x ExpectationSuite (name, meta, expectations
with type/kwargs/meta), named after the table it checks (SUITE_FOR_TABLE; `meta.table` restates it
for readers). `meta.critical` on an expectation says whether its failure fails the stage (absent = critical, so a
forgotten flag errs on the safe side). Values that depend on the run (row-count bounds, the allowed
fraction of missing ages, image size bounds) are GX suite parameters, `{"$PARAMETER": name}`, filled
from the stage's flags.

GX runs in an ephemeral (in-memory) context; its only files are the Data Docs site, written to a
directory the caller chooses.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermaops.errors import StageError

log = logging.getLogger(__name__)

# The suites the validate stage needs, by the table they check. File name = suite name + ".json".
SUITE_FOR_TABLE = {
    "metadata": "ham10000_metadata",
    "image_facts": "ham10000_images",
    "classes": "ham10000_classes",
    "mask_facts": "ham10000_masks",
}
DOCS_SITE = "dermaops"
EXAMPLES = 5
# The column that names a failed row in results and summaries, per table: the image tables' rows are images,
# the classes table's rows are classes (its failed values alone, "0, 0", would not say which class).
INDEX_COLUMNS = {"metadata": "image_id", "image_facts": "image_id", "classes": "dx", "mask_facts": "image_id"}


def default_expectations_dir() -> Path:
    """$DERMAOPS_EXPECTATIONS_DIR (set by the container images), else the repository's expectations/."""
    configured = os.environ.get("DERMAOPS_EXPECTATIONS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "expectations"


def _parameters_used(value: Any) -> set[str]:
    if isinstance(value, dict):
        if set(value) == {"$PARAMETER"}:
            return {value["$PARAMETER"]}
        return set().union(*(_parameters_used(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_parameters_used(v) for v in value)) if value else set()
    return set()


def _read_suite_file(path: Path, table: str) -> dict:
    if not path.is_file():
        raise StageError(f"expectation suite file missing: {path} (needed for the {table} table)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise StageError(f"expectation suite {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("expectations"), list):
        raise StageError(f"expectation suite {path} has no 'expectations' list")
    if config.get("name") != path.stem:
        raise StageError(f"expectation suite {path} is named {config.get('name')!r}; expected {path.stem!r}")
    return config


def read_suite_files(directory: Path, parameters: dict[str, Any]) -> dict[str, dict]:
    """table -> suite config (JSON), checked without importing GX: files exist, parse, are named
    after their file, and every $PARAMETER they use has a value."""
    configs = {}
    for table, name in SUITE_FOR_TABLE.items():
        path = directory / f"{name}.json"
        config = _read_suite_file(path, table)
        missing = sorted(_parameters_used(config["expectations"]) - set(parameters))
        if missing:
            raise StageError(f"expectation suite {path} uses parameters {missing} that the stage does not supply")
        configs[table] = config
    return configs


def build_suites(configs: dict[str, dict], directory: Path) -> dict:
    """table -> gx.ExpectationSuite; a bad expectation type or kwargs is named with its file."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    suites = {}
    for table, config in configs.items():
        expectations = []
        for i, entry in enumerate(config["expectations"]):
            try:
                expectations.append(ExpectationConfiguration(**entry).to_domain_obj())
            except Exception as exc:  # GX raises several types for a bad type/kwargs
                kind = entry.get("type") if isinstance(entry, dict) else entry
                path = directory / f"{config['name']}.json"
                raise StageError(f"expectation #{i} ({kind}) in {path} is not valid: {exc}") from exc
        suites[table] = gx.ExpectationSuite(name=config["name"], expectations=expectations, meta=config.get("meta"))
    return suites


def _plain(value: Any) -> Any:
    """GX results hold numpy scalars and NaN; make them strict JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,  # no phoning home from pipeline containers
        progress_bars=ProgressBarsConfig(globally=False),  # tqdm bars would flood the task log
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suites(suites: dict, tables: dict, parameters: dict[str, Any], docs_dir: Path) -> dict[str, dict]:
    """Validate each table with its suite and build the Data Docs site in docs_dir.

    Returns suite name -> the GX validation result as a JSON-ready dict.
    """
    import great_expectations as gx

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("dermaops")
    results = {}
    for table, suite in suites.items():
        frame = tables[table]
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole_table")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch, suite=context.suites.add(suite))
        )
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
        if INDEX_COLUMNS.get(table) in frame.columns:
            result_format["unexpected_index_column_names"] = [INDEX_COLUMNS[table]]
        result = definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            result_format=result_format,
        )
        results[suite.name] = _plain(result.to_json_dict())
        stats = result.statistics
        log.info(
            "suite %s on %s (%d rows): %d of %d expectations met",
            suite.name,
            table,
            len(frame),
            stats["successful_expectations"],
            stats["evaluated_expectations"],
        )
    context.build_data_docs(site_names=[DOCS_SITE])
    return results


@dataclass(frozen=True)
class Outcome:
    """One expectation's result, reduced to what a person needs to act on it."""

    suite: str
    expectation: str
    column: str | None
    critical: bool
    success: bool
    unexpected_count: int | None
    element_count: int | None
    examples: tuple[str, ...]
    observed: Any
    expected: str | None
    error: str | None

    def detail(self) -> str:
        """What went wrong: `3 unexpected of 70, e.g. ISIC_0024306=melanoma` or `observed 5 (expected 10..20)`."""
        if self.error:
            return f"could not be evaluated: {self.error}"
        if self.unexpected_count is not None:
            text = f"{self.unexpected_count:,} unexpected"
            text += f" of {self.element_count:,}" if self.element_count is not None else ""
            return f"{text}, e.g. {', '.join(self.examples)}" if self.examples else text
        text = f"observed {self.observed}"
        return f"{text} (expected {self.expected})" if self.expected else text

    def describe(self) -> str:
        """One line: `suite: type(column): detail`."""
        target = f"{self.expectation}({self.column})" if self.column else self.expectation
        return f"{self.suite}: {target}: {self.detail()}"


def _short(value: Any, width: int = 24) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _examples(result: dict, column: str | None, index: str | None) -> tuple[str, ...]:
    indexed = result.get("partial_unexpected_index_list")
    if index and indexed and isinstance(indexed[0], dict):
        if column == index:
            return tuple(_short(row.get(index)) for row in indexed[:EXAMPLES])
        return tuple(f"{row.get(index)}={_short(row.get(column))}" for row in indexed[:EXAMPLES])
    return tuple(_short(v) for v in result.get("partial_unexpected_list", [])[:EXAMPLES])


def _error(exception_info: dict | None) -> str | None:
    """GX reports either one exception_info or one per failed metric."""
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    for info in infos:
        if isinstance(info, dict) and info.get("raised_exception"):
            return _short(info.get("exception_message") or "exception", 160)
    return None


def _expected(kwargs: dict) -> str | None:
    if "min_value" in kwargs or "max_value" in kwargs:
        return f"{kwargs.get('min_value')}..{kwargs.get('max_value')}"
    if "value" in kwargs:
        return str(kwargs["value"])
    if "column_set" in kwargs:
        return f"columns {kwargs['column_set']}"
    return None


def outcomes(results: dict[str, dict]) -> list[Outcome]:
    """Outcome per expectation, in suite order, from run_suites()'s results."""
    found = []
    table_of = {suite: table for table, suite in SUITE_FOR_TABLE.items()}
    for suite, validation in results.items():
        for item in validation["results"]:
            config = item["expectation_config"]
            kwargs = config.get("kwargs", {})
            result = item.get("result") or {}
            column = kwargs.get("column")
            found.append(
                Outcome(
                    suite=suite,
                    expectation=config["type"],
                    column=column,
                    critical=bool((config.get("meta") or {}).get("critical", True)),
                    success=bool(item["success"]),
                    unexpected_count=result.get("unexpected_count"),
                    element_count=result.get("element_count"),
                    examples=_examples(result, column, INDEX_COLUMNS.get(table_of.get(suite, ""))),
                    observed=result.get("observed_value"),
                    expected=_expected(kwargs),
                    error=_error(item.get("exception_info")),
                )
            )
    return found
