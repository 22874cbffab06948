"""The data-quality report of the validate stage: figures from the metadata and the image facts,
rendered as markdown (dq_report.md) and a class-distribution bar chart (class_distribution.png).

The figures are computed here from the tables, not taken from GX, so the report reads the same
whatever the suites contain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dermaops.dataset import CLASSES
from dermaops.gx_validation import Outcome

DIAGNOSES = {
    "akiec": "actinic keratoses / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}
# HAM10000 writes "unknown" for an unrecorded sex or body site: not a blank, but just as missing.
UNKNOWN = "unknown"


def count(n: int) -> str:
    return f"{n:,}"


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f} %" if whole else "n/a"


@dataclass(frozen=True)
class DataFigures:
    n_rows: int
    n_lesions: int
    class_counts: dict[str, int]  # largest first; only classes that occur
    absent_classes: tuple[str, ...]
    missing: dict[str, int]  # column -> blank cells
    unknown: dict[str, int]  # column -> cells recorded as "unknown"
    n_images: int
    images_per_archive: dict[str, int]
    undecodable: tuple[str, ...]  # "image_id (error)"
    modes: dict[str, int]
    formats: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> images, most common first
    total_bytes: int
    duplicate_byte_groups: tuple[str, ...]  # "ISIC_a = ISIC_b (one lesion HAM_x)"
    images_without_metadata: int

    @property
    def imbalance_ratio(self) -> float | None:
        """Largest over smallest class count (classes that occur); None with fewer than two classes."""
        if len(self.class_counts) < 2:
            return None
        counts = list(self.class_counts.values())
        return counts[0] / counts[-1]

    @property
    def missing_age(self) -> int:
        return self.missing.get("age", 0)


def _value_counts(series) -> dict:
    return {str(k): int(v) for k, v in series.value_counts(dropna=True).items()}


def _byte_twins(group) -> str:
    """`ISIC_a = ISIC_b (one lesion HAM_x)`: which ids share one file, and whether that can leak."""
    lesions = sorted(str(v) for v in group["lesion_id"].dropna().unique())
    where = f"one lesion {lesions[0]}" if len(lesions) == 1 else f"{len(lesions)} lesions: {', '.join(lesions)}"
    return f"{' = '.join(sorted(group['image_id']))} ({where})"


def compute_figures(metadata, facts) -> DataFigures:
    import pandas as pd

    dx = metadata["dx"].dropna().astype(str)
    counts = dx.value_counts()
    decoded = facts[facts["decodes"]]
    failed = facts[~facts["decodes"]]
    sizes = decoded["width"].astype(str) + "x" + decoded["height"].astype(str)
    duplicated = facts[facts["sha256"].duplicated(keep=False)]
    groups = tuple(_byte_twins(group) for _, group in duplicated.groupby("sha256", sort=True))
    return DataFigures(
        n_rows=len(metadata),
        n_lesions=int(metadata["lesion_id"].nunique()),
        class_counts={str(k): int(v) for k, v in counts.items()},
        absent_classes=tuple(c for c in CLASSES if c not in counts.index),
        missing={c: int(metadata[c].isna().sum()) for c in metadata.columns},
        unknown={
            c: int((metadata[c] == UNKNOWN).sum())
            for c in metadata.columns
            if not pd.api.types.is_numeric_dtype(metadata[c])
        },
        n_images=len(facts),
        images_per_archive=dict(sorted(_value_counts(facts["archive"]).items())),
        undecodable=tuple(f"{row.image_id} ({row.error})" for row in failed.itertuples()),
        modes=_value_counts(decoded["mode"]),
        formats=_value_counts(decoded["format"]),
        sizes=_value_counts(sizes),
        total_bytes=int(facts["bytes"].sum()),
        duplicate_byte_groups=groups,
        images_without_metadata=int((~facts["in_metadata"]).sum()),
    )


# The lesion-share percentiles the report and the stage summary give (label -> percentile).
SHARE_PERCENTILES = {"min": 0, "p1": 1, "p5": 5, "median": 50, "p95": 95, "p99": 99, "max": 100}
EXTREMES = 3  # the smallest and the largest masks named in the report


@dataclass(frozen=True)
class MaskFigures:
    n_masks: int
    images_without_mask: tuple[str, ...]
    masks_without_image: tuple[str, ...]
    duplicated: tuple[str, ...]  # image_ids with more than one mask
    undecodable: tuple[str, ...]  # "image_id (error)"
    modes: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> masks
    size_fits: dict[str, int]  # image / original / "300x225 (image 200x150)"
    values: dict[str, int]  # grey levels present -> masks
    lesion_share: dict[str, float]  # SHARE_PERCENTILES over the masks that decode
    smallest: tuple[str, ...]  # "image_id lesion_share"
    largest: tuple[str, ...]

    def summary(self) -> dict:
        """What the validate stage's summary says about the masks."""
        return {
            "present": True,
            "n_masks": self.n_masks,
            "images_without_mask": len(self.images_without_mask),
            "masks_without_image": len(self.masks_without_image),
            "duplicated": len(self.duplicated),
            "undecodable": len(self.undecodable),
            "lesion_share": self.lesion_share,
        }


def compute_mask_figures(mask_facts) -> MaskFigures:
    """Figures of the per-mask facts table (`mask_facts.build_mask_facts`)."""
    masks = mask_facts[mask_facts["has_mask"]]
    decoded = masks[masks["decodes"].astype(bool)]
    failed = masks[~masks["decodes"].astype(bool)]
    shares = decoded["lesion_share"].astype(float)
    by_share = decoded.sort_values(["lesion_share", "image_id"])
    named = [f"{row.image_id} {row.lesion_share:.4f}" for row in by_share.itertuples()]
    counts = masks["image_id"].value_counts()
    return MaskFigures(
        n_masks=len(masks),
        images_without_mask=tuple(mask_facts.loc[~mask_facts["has_mask"], "image_id"]),
        masks_without_image=tuple(masks.loc[~masks["has_image"], "image_id"]),
        duplicated=tuple(sorted(counts[counts > 1].index)),
        undecodable=tuple(f"{row.image_id} ({row.error})" for row in failed.itertuples()),
        modes=_value_counts(decoded["mode"]),
        sizes=_value_counts(decoded["width"].astype(str) + "x" + decoded["height"].astype(str)),
        size_fits=_value_counts(decoded["size_fit"]),
        values=_value_counts(decoded["values"]),
        lesion_share=(
            {k: round(float(shares.quantile(q / 100)), 4) for k, q in SHARE_PERCENTILES.items()} if len(shares) else {}
        ),
        smallest=tuple(named[:EXTREMES]),
        largest=tuple(named[::-1][:EXTREMES]),
    )


def _ids(ids: tuple[str, ...], limit: int = 5) -> str:
    return f"{count(len(ids))}" + (f" ({', '.join(ids[:limit])}{', ...' if len(ids) > limit else ''})" if ids else "")


def render_mask_section(figures: MaskFigures | None, absent_note: str, facts_name: str) -> list[str]:
    """The report's "Lesion masks" section; `absent_note` says why there is none when `figures` is None."""
    lines = ["## Lesion masks", ""]
    if figures is None:
        return [*lines, f"None: {absent_note}. Not a failure: the mask checks are skipped.", ""]
    share = ", ".join(f"{k} {v:.4f}" for k, v in figures.lesion_share.items()) or "n/a"
    return [
        *lines,
        f"- masks: {count(figures.n_masks)} (one row each in `{facts_name}`)",
        f"- images without a mask: {_ids(figures.images_without_mask)}",
        f"- masks without an image: {_ids(figures.masks_without_image)}",
        f"- image_ids with more than one mask: {_ids(figures.duplicated)}",
        f"- decoded: {count(figures.n_masks - len(figures.undecodable))} of {count(figures.n_masks)}; "
        f"failed: {_ids(figures.undecodable)}",
        f"- file modes: {_listing(figures.modes)} (P: palette images, read through their palette)",
        f"- sizes (width x height): {_listing(figures.sizes)}; fit: {_listing(figures.size_fits)}",
        f"- grey levels present: {_listing(figures.values)}",
        f"- lesion share (pixels at 255 / all pixels): {share}",
        f"- smallest lesions: {', '.join(figures.smallest) or 'n/a'}; largest: {', '.join(figures.largest) or 'n/a'}",
        "",
    ]


def _items(figures: DataFigures) -> list[tuple[str, int]]:
    return list(figures.class_counts.items())


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    # A "|" inside a value (an odd dx, an error message) would split the cell.
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _listing(counts: dict[str, int], limit: int = 5) -> str:
    shown = ", ".join(f"{k} {count(v)}" for k, v in list(counts.items())[:limit])
    return shown + (f", ... ({len(counts)} in all)" if len(counts) > limit else "") if counts else "none"


def render_markdown(
    figures: DataFigures,
    outcomes: list[Outcome],
    *,
    dataset_uri: str,
    dataset_version: str,
    chart_name: str,
    data_docs_index: str,
    results_files: list[str],
    extra_sections: list[str] = (),
) -> str:
    failed_critical = [o for o in outcomes if o.critical and not o.success]
    failed_other = [o for o in outcomes if not o.critical and not o.success]
    if failed_critical:
        verdict = f"**FAILED**: {len(failed_critical)} critical expectation(s) not met"
    else:
        verdict = "**PASSED**: every critical expectation met"
    if failed_other:
        verdict += f"; {len(failed_other)} non-critical finding(s) reported below"
    n = figures.n_rows
    lines = [
        f"# Data-quality report: HAM10000 {dataset_version}",
        "",
        f"- dataset: `{dataset_uri}`",
        f"- verdict: {verdict}",
        f"- metadata: {count(n)} rows, {count(figures.n_lesions)} lesions; images: {count(figures.n_images)}",
        "",
        "## Class distribution",
        "",
    ]
    labelled = sum(figures.class_counts.values())
    rows = [[c, DIAGNOSES.get(c, "not a HAM10000 class"), count(v), percent(v, n)] for c, v in _items(figures)]
    rows.append(["**total**", "", count(labelled), percent(labelled, n)])
    lines += _table(["class", "diagnosis", "count", "percent"], rows, "llrr")
    lines.append("")
    ratio = figures.imbalance_ratio
    if ratio is not None:
        (big, big_n), (small, small_n) = _items(figures)[0], _items(figures)[-1]
        lines.append(
            f"Imbalance ratio (largest / smallest class): **{ratio:.1f}:1** "
            f"({big} {count(big_n)} / {small} {count(small_n)})."
        )
    if figures.absent_classes:
        lines.append(f"Classes with no rows: {', '.join(figures.absent_classes)}.")
    lines += ["", f"![class distribution]({chart_name})", "", "## Missing values", ""]
    rows = [
        [f"`{c}`", count(m), percent(m, n), count(figures.unknown[c]) if c in figures.unknown else "-"]
        for c, m in figures.missing.items()
    ]
    lines += _table(["column", "missing", "percent", f"recorded as '{UNKNOWN}'"], rows, "lrrr")
    lines += ["", "## Image facts", ""]
    decoded = figures.n_images - len(figures.undecodable)
    lines += [
        f"- images: {count(figures.n_images)} ({_listing(figures.images_per_archive)})",
        f"- decoded: {count(decoded)} of {count(figures.n_images)}; failed: {count(len(figures.undecodable))}"
        + (f" ({'; '.join(figures.undecodable[:5])})" if figures.undecodable else ""),
        f"- colour modes: {_listing(figures.modes)}",
        f"- formats: {_listing(figures.formats)}",
        f"- sizes (width x height): {_listing(figures.sizes)}",
        f"- total size: {figures.total_bytes / 1e6:.1f} MB",
        f"- groups of byte-identical files: {count(len(figures.duplicate_byte_groups))}"
        + (f" ({'; '.join(figures.duplicate_byte_groups[:5])})" if figures.duplicate_byte_groups else ""),
        f"- images without a metadata row: {count(figures.images_without_metadata)}",
        "",
        *extra_sections,
        "## Expectations",
        "",
    ]
    rows = [
        [
            o.suite,
            o.expectation,
            f"`{o.column}`" if o.column else "",
            "yes" if o.critical else "no",
            "pass" if o.success else ("**FAIL**" if o.critical else "finding"),
            o.detail() if not o.success else "",
        ]
        for o in outcomes
    ]
    lines += _table(["suite", "expectation", "column", "critical", "result", "details"], rows, "llllll")
    lines += [
        "",
        f"Full results: {', '.join(f'`{name}`' for name in results_files)}; "
        f"rendered by Great Expectations in [Data Docs]({data_docs_index}). Per-image facts: `image_facts.csv`.",
        "",
    ]
    return "\n".join(lines)


def render_chart(figures: DataFigures, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures.class_counts)
    values = list(figures.class_counts.values())
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    bars = ax.bar(names, values, color="#4C72B0")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{count(value)}\n{percent(value, figures.n_rows)}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ratio = figures.imbalance_ratio
    title = f"HAM10000 class distribution ({count(figures.n_rows)} images"
    title += f", imbalance {ratio:.1f}:1)" if ratio is not None else ")"
    ax.set_title(title)
    ax.set_xlabel("diagnosis (dx)")
    ax.set_ylabel("images")
    ax.set_ylim(0, max(values, default=1) * 1.18)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
