"""Validate a dataset version with Great Expectations suites and write a data-quality report.

GX suites are kept as JSON files in the expectations directory: ham10000_metadata checks
HAM10000_metadata.csv (columns, ids, label and code sets, age, row count); ham10000_images checks a
per-image facts table built by decoding every image in the archives (decodes, RGB, plausible size,
no byte-identical files under two image_ids); ham10000_classes checks the class mix; ham10000_masks
checks a per-mask facts table built by decoding every lesion mask (one per image, binary, the size of
its image or of the 600x450 original, a lesion share within bounds). A dataset version without masks
skips the masks suite and says so in the report and the summary (`masks.present` false): not fatal.

Writes under --out (s3://<bucket>/runs/<run_id>/validation): results/<suite>.json (GX validation
results), data_docs/ (GX Data Docs, open data_docs/index.html), dq_report.md (class distribution,
imbalance ratio, missing values, image facts, lesion masks, every expectation's outcome),
class_distribution.png, image_facts.csv, mask_facts.csv (with masks), and manifest.json last, whose
summary says "success".

With --drift-registry, the dataset is also compared with the one the registry's champion was trained on
(dermaops.drift: label, metadata and image statistics): drift.json, drift.png and a drift section in
dq_report.md. --drift-policy decides what drift does: `report` only reports it, `warn` also flags it
in the summary (notify posts a Slack warning), `fail` fails the stage after publishing, like a critical
expectation, so nothing is trained on drifted data.

A failed critical expectation fails the stage (exit 2, one line naming the expectation, column,
unexpected count and examples) AFTER those outputs are published with "success": false, so the
report explains the failure. Re-running on the same inputs gives the same verdict without redoing
the work; --force redoes it. Non-critical findings (e.g. missing ages) are reported, not fatal.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import shutil
from pathlib import Path

from dermaops import drift as drift_lib
from dermaops import quality_report
from dermaops.config import ValidateConfig
from dermaops.dataset import MASKS_ARCHIVE, Dataset
from dermaops.errors import StageError
from dermaops.gx_validation import build_suites, default_expectations_dir, outcomes, read_suite_files, run_suites
from dermaops.image_facts import build_image_facts
from dermaops.mask_facts import build_mask_facts, image_sizes
from dermaops.stage import Context, StageIO, fingerprint
from dermaops.store import S3Uri

HELP = "Great Expectations suites on metadata and per-image facts; data-quality report"
REPORT = "dq_report.md"
CHART = "class_distribution.png"
DRIFT_PLOT = "drift.png"
DRIFT_JSON = "drift.json"
FACTS = "image_facts.csv"
MASK_FACTS = "mask_facts.csv"
DOCS = "data_docs"
CONFIG = ValidateConfig  # the suites' bounds and the drift settings: flags, checks, the form's drift_policy
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset version (s3://<b>/datasets/ham10000/<version>)")
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/validation)")
    parser.add_argument(
        "--expectations",
        type=Path,
        default=None,
        help="directory of GX suite JSON files (default: $DERMAOPS_EXPECTATIONS_DIR, else the repository's "
        "expectations/)",
    )
    parser.add_argument(
        "--drift-registry",
        default=None,
        help="model registry prefix (s3://<b>/registry/ham10000): compare this dataset with the champion's "
        "training data (no comparison without it, or without a champion)",
    )


def _parameters(cfg: ValidateConfig) -> dict:
    """The suites' $PARAMETER values (the config has checked the settings they come from)."""
    from dermaops.splitting import SPLITS

    return {
        "min_lesions_per_class": len(SPLITS) if cfg.min_lesions_per_class is None else cfg.min_lesions_per_class,
        "min_rows": cfg.min_rows,
        "max_rows": cfg.max_rows,
        "min_age_present_fraction": round(1.0 - cfg.max_missing_age_fraction, 6),
        "min_image_side": cfg.min_image_side,
        "max_image_side": cfg.max_image_side,
        "min_lesion_share": cfg.min_lesion_share,
        "max_lesion_share": cfg.max_lesion_share,
    }


def class_table(metadata):
    """One row per model class: images, distinct lesions and share of the rows (absent classes get 0), for
    the ham10000_classes suite. Rows with an unknown dx are the metadata suite's to report."""
    import pandas as pd

    from dermaops.dataset import CLASSES

    known = metadata[metadata["dx"].isin(CLASSES)]
    n_images = known.groupby("dx").size().reindex(CLASSES, fill_value=0)
    n_lesions = known.groupby("dx")["lesion_id"].nunique().reindex(CLASSES, fill_value=0)
    total = max(len(metadata), 1)
    return pd.DataFrame(
        {
            "dx": list(CLASSES),
            "n_images": n_images.to_numpy(),
            "n_lesions": n_lesions.to_numpy(),
            "share": (n_images / total).round(6).to_numpy(),
        }
    )


def _verdict(summary: dict) -> dict:
    """The summary if the data passed, else the stage's one-line failure."""
    if summary["critical_failures"]:
        raise StageError(
            f"validation of {summary['dataset_uri']} failed {len(summary['critical_failures'])} critical "
            f"expectation(s): {' | '.join(summary['critical_failures'])} (report: {summary['report_uri']})"
        )
    drift = summary.get("drift") or {}
    if drift.get("detected") and drift.get("policy") == "fail":
        raise StageError(
            f"data drift with --drift-policy fail: {drift['headline']}; nothing is trained on it (report: "
            f"{summary['report_uri']}; re-run with drift_policy warn or report to train anyway)"
        )
    return summary


def reference_dataset(ctx, drift_registry: str | None, dataset: Dataset) -> tuple[Dataset | None, str]:
    """The champion's training data, or (None, why there is nothing to compare with)."""
    if not drift_registry:
        return None, "no comparison: no --drift-registry given"
    from dermaops.promotion import Registry

    registry = Registry(ctx.store, S3Uri.parse(drift_registry))
    record, problem = registry.champion_record()
    if record is None:
        return None, f"no comparison: {problem or 'no champion yet'}"
    version = record.get("dataset_version")
    if not version:
        return None, f"no comparison: {registry.champion_uri} records no dataset_version"
    if version == dataset.version:
        return None, f"no comparison needed: the champion (run {record.get('run_id')}) was trained on this version"
    uri = S3Uri(dataset.uri.bucket, dataset.uri.key.rstrip("/").rsplit("/", 1)[0]).join(version)
    try:
        return Dataset.open(ctx.store, uri, ctx.scratch / "drift-reference"), ""
    except StageError as exc:
        return None, f"no comparison: the champion's dataset version is not readable ({exc})"


def measure_drift(ctx, cfg: ValidateConfig, dataset: Dataset, reference: Dataset, n_images: int):
    """The drift report of this dataset against the reference (dermaops.drift)."""
    log.info("drift: comparing %s with the champion's %s", dataset.version, reference.version)
    ref_meta = reference.metadata
    ref_stats = drift_lib.image_stats_table(reference.iter_images(), len(ref_meta), cfg.drift_max_images)
    cur_stats = drift_lib.image_stats_table(dataset.iter_images(), n_images, cfg.drift_max_images)
    report = drift_lib.compare(
        reference.version,
        dataset.version,
        ref_meta,
        dataset.metadata,
        ref_stats,
        cur_stats,
        cfg.drift_threshold,
    )
    (log.warning if report.detected else log.info)("drift: %s", report.headline())
    return report


def _upload_docs(out, docs_dir: Path) -> None:
    for path in sorted(p for p in docs_dir.rglob("*") if p.is_file()):
        content_type = mimetypes.guess_type(path.name)[0]
        out.put_file(f"{DOCS}/{path.relative_to(docs_dir).as_posix()}", path, content_type=content_type)


def run(stage_io: StageIO, cfg: ValidateConfig, ctx: Context) -> dict:
    parameters = _parameters(cfg)
    expectations_dir = (stage_io.inputs["expectations"] or default_expectations_dir()).resolve()
    if not expectations_dir.is_dir():
        raise StageError(f"expectations directory not found: {expectations_dir} (--expectations)")
    out_uri = S3Uri.parse(stage_io.out)
    suite_configs = read_suite_files(expectations_dir, parameters)
    dataset = Dataset.open(ctx.store, stage_io.inputs["dataset"], ctx.scratch)
    drift_registry = stage_io.inputs["drift_registry"]
    reference, drift_note = reference_dataset(ctx, drift_registry, dataset)
    drift_inputs = {"policy": cfg.drift_policy, "note": drift_note}
    if reference is not None:
        drift_inputs |= {
            **{f"reference_{k}": v for k, v in reference.identity.items()},
            "threshold": cfg.drift_threshold,
            "max_images": cfg.drift_max_images,
            "version": 1,
        }
    out = ctx.output(
        out_uri,
        "validate",
        fingerprint(
            **dataset.identity,
            suites=suite_configs,
            parameters=parameters,
            **({"drift": drift_inputs} if drift_registry else {}),
        ),
    )
    finished = out.finished()
    if finished and not stage_io.force:
        log.info("validation of %s already done at %s; skipping (--force to redo)", dataset.uri, out_uri)
        return {**_verdict(finished["summary"]), "status": "skipped"}

    # Everything else that can be wrong with the inputs is found before the first write.
    suites = build_suites(suite_configs, expectations_dir)
    metadata = dataset.metadata
    log.info("decoding every image of %s (%d metadata rows)", dataset.uri, len(metadata))
    lesion_of = dict(zip(metadata["image_id"].astype(str), metadata["lesion_id"], strict=True))
    facts = build_image_facts(dataset.iter_images(), lesion_of)
    mask_facts, mask_figures, no_masks = None, None, ""
    if dataset.masks_archive is not None:
        log.info("decoding every lesion mask of %s (%s)", dataset.uri, dataset.masks_archive)
        mask_facts = build_mask_facts(dataset.iter_masks(), image_sizes(facts))
        mask_figures = quality_report.compute_mask_figures(mask_facts)
    else:
        suites.pop("mask_facts")
        no_masks = f"dataset version {dataset.version} has no lesion masks (its source had no {MASKS_ARCHIVE})"
        log.warning("%s; the mask checks are skipped", no_masks)

    docs_dir = ctx.scratch / "validate" / DOCS
    shutil.rmtree(docs_dir, ignore_errors=True)  # a kept scratch dir must not leak an earlier run's pages
    tables = {"metadata": metadata, "image_facts": facts, "classes": class_table(metadata), "mask_facts": mask_facts}
    results = run_suites(suites, tables, parameters, docs_dir)
    found = outcomes(results)
    figures = quality_report.compute_figures(metadata, facts)
    drift = measure_drift(ctx, cfg, dataset, reference, len(facts)) if reference is not None else None
    drift_plot = None
    if drift is not None:
        drift_plot = drift_lib.render_plot(drift, ctx.scratch / "validate" / DRIFT_PLOT)
    policy_note = f"policy `{cfg.drift_policy}`" + (
        {"report": ": reported only", "warn": ": notify posts a warning", "fail": ": the run stops before training"}[
            cfg.drift_policy
        ]
        if drift is not None and drift.detected
        else ""
    )
    drift_section = drift_lib.render_section(
        drift, DRIFT_PLOT if drift_plot else None, note=drift_note if drift is None else policy_note
    )
    results_files = [f"results/{name}.json" for name in results]
    report = quality_report.render_markdown(
        figures,
        found,
        dataset_uri=str(dataset.uri),
        dataset_version=dataset.version,
        chart_name=CHART,
        data_docs_index=f"{DOCS}/index.html",
        results_files=results_files,
        extra_sections=[*quality_report.render_mask_section(mask_figures, no_masks, MASK_FACTS), *drift_section],
    )
    chart = quality_report.render_chart(figures, ctx.scratch / "validate" / CHART)

    out.unpublish()
    for name, result in results.items():
        out.put_json(f"results/{name}.json", result)
    _upload_docs(out, docs_dir)
    facts_csv = io.StringIO()
    facts.to_csv(facts_csv, index=False)
    out.put_text(FACTS, facts_csv.getvalue(), "text/csv")
    if mask_facts is not None:
        out.put_text(MASK_FACTS, mask_facts.to_csv(index=False), "text/csv")
    out.put_file(CHART, chart, content_type="image/png")
    if drift is not None:
        out.put_json(DRIFT_JSON, drift.to_json())
        out.put_file(DRIFT_PLOT, drift_plot, content_type="image/png")
    report_uri = out.put_text(REPORT, report, "text/markdown; charset=utf-8")

    critical = [o.describe() for o in found if o.critical and not o.success]
    ratio = figures.imbalance_ratio
    summary = {
        "success": not critical,
        "dataset_uri": str(dataset.uri),
        "dataset_version": dataset.version,
        "n_rows": figures.n_rows,
        "n_images": figures.n_images,
        "class_counts": figures.class_counts,
        "imbalance_ratio": round(ratio, 2) if ratio is not None else None,
        "missing_age": figures.missing_age,
        "missing_age_percent": round(100.0 * figures.missing_age / figures.n_rows, 2) if figures.n_rows else None,
        "failed_expectations": sum(not o.success for o in found),
        "critical_failures": critical,
        "findings": [o.describe() for o in found if not o.critical and not o.success],
        "report_uri": str(report_uri),
        "data_docs_uri": str(out.uri(f"{DOCS}/index.html")),
        "results_uris": [str(out.uri(name)) for name in results_files],
        "image_facts_uri": str(out.uri(FACTS)),
        "masks": (
            {**mask_figures.summary(), "archive": dataset.masks_archive, "mask_facts_uri": str(out.uri(MASK_FACTS))}
            if mask_figures is not None
            else {"present": False, "note": no_masks}
        ),
        "chart_uri": str(out.uri(CHART)),
        "drift": (
            {**drift.summary(), "policy": cfg.drift_policy, "drift_uri": str(out.uri(DRIFT_JSON))}
            if drift is not None
            else {"detected": False, "policy": cfg.drift_policy, "headline": drift_note}
        ),
    }
    out.publish(summary)
    for line in summary["findings"]:
        log.warning("finding (not critical): %s", line)
    log.info("report: %s", report_uri)
    return _verdict(summary)
