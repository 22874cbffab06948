"""Split a dataset version into train/val/test tables and a split report.

--strategy lesion (default): stratified by dx and grouped by lesion_id, so no lesion has images in two
splits; each class is divided by the fractions counted in images. This is the honest evaluation split.
--strategy image: the seed report's image-level split (stratified by dx, lesions ignored), kept for
comparison; its report states how many lesions leak across splits. --strategy dermamnist: the official
DermaMNIST (MedMNIST v2) split read from --official-splits (dermamnist_splits.csv), to compare with
published numbers; it leaks lesions too.

Writes to --out (s3://<bucket>/runs/<run_id>/split): train.csv, val.csv, test.csv (image_id, lesion_id,
dx, label, dx_type, age, sex, localization; label indexes dermaops.dataset.CLASSES), split_report.md,
split_report.json, and manifest.json last. Lesion overlap is measured on the written tables; the
lesion strategy fails if it is not zero.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from dermaops.config import SPLIT_STRATEGIES, SplitConfig
from dermaops.dataset import CLASSES, Dataset
from dermaops.errors import StageError
from dermaops.stage import Context, StageIO, fingerprint, skipped
from dermaops.store import ArtifactStore, S3Uri, sha256_bytes

HELP = "train/val/test split: stratified by dx, grouped by lesion (or image-level / official DermaMNIST)"

STRATEGIES = SPLIT_STRATEGIES
CONFIG = SplitConfig  # --strategy, --seed and --fractions
DESCRIPTIONS = {
    "lesion": "stratified by dx, grouped by lesion_id (no lesion in two splits), fractions by images per class",
    "image": "image-level, stratified by dx, lesions ignored (the seed report's split, kept for comparison)",
    "dermamnist": "the official DermaMNIST (MedMNIST v2) image-level split, kept to compare with published numbers",
}
COLUMNS = ["image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex", "localization"]
MAX_DEVIATION_POINTS = 1.0

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="published dataset version (s3://<b>/datasets/ham10000/<version>)"
    )
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/split)")
    parser.add_argument(
        "--official-splits",
        default=None,
        help="dermamnist_splits.csv (local path or s3:// URI; columns image_id, dermamnist_split); "
        "required by and only used with --strategy dermamnist",
    )


def run(stage_io: StageIO, cfg: SplitConfig, ctx: Context) -> dict:
    official_splits = stage_io.inputs["official_splits"]
    out_uri = S3Uri.parse(stage_io.out)
    if cfg.strategy == "dermamnist" and not official_splits:
        raise StageError("--strategy dermamnist needs --official-splits (path or s3:// URI of dermamnist_splits.csv)")
    if cfg.strategy != "dermamnist" and official_splits:
        raise StageError(f"--official-splits is only used by --strategy dermamnist, not {cfg.strategy!r}")
    dataset = Dataset.open(ctx.store, stage_io.inputs["dataset"], ctx.scratch)
    if "dataset_version" not in dataset.manifest:
        raise StageError(f"{dataset.uri} is not a dataset version: its manifest.json has no dataset_version")
    official = _read_official_splits(ctx.store, official_splits) if official_splits else None

    # Only what changes the result goes into the fingerprint: the official split ignores seed and fractions.
    params = (
        {"strategy": cfg.strategy, "official_splits_sha256": sha256_bytes(official)}
        if official is not None
        else {"strategy": cfg.strategy, "seed": cfg.seed, "fractions": list(cfg.fraction_values)}
    )
    out = ctx.output(
        out_uri,
        "split",
        fingerprint(
            **dataset.identity,
            **params,
        ),
    )
    if (manifest := out.finished()) and not stage_io.force:
        log.info("split at %s is finished for these inputs; skipping (use --force to redo)", out_uri)
        return skipped(manifest)

    frames, report = _split(cfg, official_splits, dataset, official)
    log.info(
        "%s split of %d images: %s; lesions in several splits: %d",
        cfg.strategy,
        report["n_images"],
        ", ".join(f"{name} {n}" for name, n in report["counts"].items()),
        report["lesion_overlap"]["lesions_in_several_splits"],
    )

    out.unpublish()
    for name, frame in frames.items():
        out.put_text(f"{name}.csv", frame.to_csv(index=False), "text/csv")
    report_uri = out.put_text("split_report.md", _markdown(report), "text/markdown; charset=utf-8")
    out.put_json("split_report.json", report)
    summary = {
        "split_uri": str(out_uri),
        "dataset_uri": str(dataset.uri),
        "dataset_version": dataset.version,
        "strategy": cfg.strategy,
        "seed": None if official is not None else cfg.seed,
        "fractions": report["target_fractions"],
        "counts": report["counts"],
        "lesion_overlap": report["lesion_overlap"]["lesions_in_several_splits"],
        "report_uri": str(report_uri),
    }
    out.publish(summary)
    return summary


def _read_official_splits(store: ArtifactStore, location: str) -> bytes:
    if location.startswith("s3://"):
        return store.get_bytes(location)
    path = Path(location)
    if not path.is_file():
        raise StageError(f"official split file not found: {location}")
    return path.read_bytes()


def _split(
    cfg: SplitConfig, official_splits: str | None, dataset: Dataset, official: bytes | None
) -> tuple[dict, dict]:
    """The three tables and the report; every check runs here, before anything is written."""
    import pandas as pd

    from dermaops import splitting

    meta = dataset.metadata
    splitting.check_metadata(meta, CLASSES)
    mixed = splitting.mixed_dx_lesions(meta)
    if cfg.strategy == "lesion":
        splitting.check_enough_per_class(meta, by_lesion=True)
        split = splitting.lesion_split(meta, cfg.fraction_values, cfg.seed)
    elif cfg.strategy == "image":
        splitting.check_enough_per_class(meta, by_lesion=False)
        split = splitting.image_split(meta, cfg.fraction_values, cfg.seed)
    else:
        try:
            table = pd.read_csv(io.BytesIO(official), dtype={"image_id": str, "dermamnist_split": str})
        except (ValueError, UnicodeDecodeError) as exc:
            raise StageError(f"official split file {official_splits} is not a readable CSV ({exc})") from None
        split = splitting.official_split(meta, table)
    splitting.check_every_class_in_every_split(meta, split)

    labelled = meta.assign(label=meta["dx"].map(CLASSES.index))[COLUMNS]
    frames = {name: labelled[split == name].sort_values("image_id").reset_index(drop=True) for name in splitting.SPLITS}
    leakage = splitting.lesion_leakage(frames)
    if cfg.strategy == "lesion" and leakage["lesions_in_several_splits"]:
        raise StageError(
            f"lesion-grouped split put {leakage['lesions_in_several_splits']} lesions in more than one split "
            f"(e.g. {', '.join(leakage['examples'])}); refusing to write it"
        )
    counts = splitting.class_table(frames, CLASSES)
    targets = None if official is not None else dict(zip(splitting.SPLITS, cfg.fraction_values, strict=True))
    report = {
        "strategy": cfg.strategy,
        "description": DESCRIPTIONS[cfg.strategy],
        "seed": None if official is not None else cfg.seed,
        "target_fractions": targets,
        "dataset_uri": str(dataset.uri),
        "dataset_version": dataset.version,
        "official_splits": None if official is None else {"source": official_splits, "sha256": sha256_bytes(official)},
        "n_images": int(len(meta)),
        "n_lesions": int(meta["lesion_id"].nunique()),
        "counts": {name: len(frame) for name, frame in frames.items()},
        "class_counts": {name: {dx: int(n) for dx, n in row.items()} for name, row in counts.iterrows()},
        "class_split_fractions": {
            dx: {name: round(float(counts.at[name, dx] / counts.at["all", dx]), 4) for name in splitting.SPLITS}
            for dx in CLASSES
        },
        "lesion_overlap": leakage,
        "mixed_dx_lesions": {"count": len(mixed), "examples": mixed[:5]},
    }
    if targets is not None:
        report["max_deviation_points"] = {
            dx: round(100 * max(abs(f - targets[name]) for name, f in fractions.items()), 2)
            for dx, fractions in report["class_split_fractions"].items()
        }
    return frames, report


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "-"


def _markdown(report: dict) -> str:
    splits = list(report["counts"])
    counts = report["class_counts"]
    targets = report["target_fractions"]
    leak = report["lesion_overlap"]
    lines = [
        "# Split report",
        "",
        f"- Strategy: `{report['strategy']}`: {report['description']}.",
        f"- Dataset: {report['dataset_uri']} (version `{report['dataset_version']}`).",
    ]
    if targets is None:
        source = report["official_splits"]
        lines.append(f"- Official split file: {source['source']} (sha256 `{source['sha256']}`); seed not used.")
    else:
        lines.append(
            f"- Seed: {report['seed']}; target fractions per class: "
            + " / ".join(f"{name} {targets[name]:g}" for name in splits)
            + "."
        )
    lines += [
        f"- Images: {report['n_images']:,} from {report['n_lesions']:,} lesions; "
        + " / ".join(f"{name} {n:,}" for name, n in report["counts"].items())
        + ".",
        f"- Lesion overlap, checked on the written tables (set intersection of lesion_ids): "
        f"**{leak['lesions_in_several_splits']:,}** lesions have images in more than one split.",
    ]
    mixed = report["mixed_dx_lesions"]
    if mixed["count"]:
        lines.append(
            f"- {mixed['count']} lesions carry more than one dx (e.g. {', '.join(mixed['examples'])})"
            + ("; each was stratified by its majority dx." if report["strategy"] == "lesion" else ".")
        )
    elif report["strategy"] == "lesion":
        lines.append("- Every lesion has a single dx, so stratifying lesions by dx is exact.")

    classes = list(report["class_split_fractions"])
    lines += [
        "",
        "## Class counts and proportions per split",
        "",
        "| split | total | " + " | ".join(classes) + " |",
        "|---|---:|" + "---:|" * len(classes),
    ]
    for name in [*splits, "all"]:
        total = sum(counts[name].values())
        cells = [f"{counts[name][dx]:,} ({_pct(counts[name][dx], total)})" for dx in classes]
        lines.append(f"| {name} | {total:,} | " + " | ".join(cells) + " |")

    deviation = report.get("max_deviation_points")
    lines += [
        "",
        "## Split fractions per class",
        "",
        "| class | images | " + " | ".join(splits) + (" | max deviation from target |" if deviation else " |"),
        "|---|---:|" + "---:|" * (len(splits) + (1 if deviation else 0)),
    ]
    for dx in classes:
        cells = [f"{100 * report['class_split_fractions'][dx][name]:.2f} %" for name in splits]
        extra = f" | {deviation[dx]:.2f} points" if deviation else ""
        lines.append(f"| {dx} | {counts['all'][dx]:,} | " + " | ".join(cells) + extra + " |")
    if deviation:
        off = [dx for dx, points in deviation.items() if points > MAX_DEVIATION_POINTS]
        lines += [
            "",
            f"Classes more than {MAX_DEVIATION_POINTS:g} point off target: {', '.join(off)} "
            "(too few lesions to divide finer)."
            if off
            else f"Every class is within {MAX_DEVIATION_POINTS:g} point of its target fractions.",
        ]

    lines += ["", "## Lesion leakage", ""]
    if leak["lesions_in_several_splits"]:
        shared = leak["images_sharing_lesion_with_train"]
        lines += [
            f"{leak['lesions_in_several_splits']:,} of {report['n_lesions']:,} lesions have images in more than one "
            "split ("
            + ", ".join(f"{pair} {n:,}" for pair, n in leak["pairs"].items())
            + "). "
            + "; ".join(
                f"{n:,} of {report['counts'][name]:,} {name} images belong to a lesion that also has images in train"
                for name, n in shared.items()
            )
            + ".",
            "",
            "Images of one lesion look alike, so metrics on this split overstate how a model does on new lesions. "
            "Use it only to compare with results published on the same split.",
        ]
    else:
        lines.append("No lesion has images in more than one split (" + ", ".join(leak["pairs"]) + ": 0 each).")
    return "\n".join(lines) + "\n"
