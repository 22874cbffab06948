"""Data drift of a new dataset version against the one the champion was trained on.

Each compared feature gets the Population Stability Index (PSI) of its distribution in the new data
against the reference, plus the usual test of the same question:

- the label (dx) and the categorical metadata (sex, localization): PSI over the categories and a
  chi-square test of the 2 x K contingency table;
- age and the image statistics (per-channel mean and std, brightness, sharpness, width, height):
  PSI over ten bins cut at the reference's deciles, and the two-sample Kolmogorov-Smirnov test.

PSI is the verdict, the tests are context: with thousands of images a chi-square or KS p-value is
tiny for shifts nobody would act on, while PSI measures the size of the shift. The customary reading
(credit scoring, where PSI comes from, and most monitoring tools since): below 0.1 stable, 0.1-0.25
a moderate shift, above 0.25 a major one. A feature drifts when its PSI reaches the threshold (0.2 by
default, between the two).

Image statistics are computed on a seeded sample of images (the same ids for the same data), so a
full-resolution dataset costs a bounded number of decodes. Sharpness is the variance of the Laplacian
of the grey image (higher = more fine detail); brightness the mean of ITU-R BT.601 luma.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PSI = 0.2
METADATA_CATEGORICAL = ("sex", "localization")
IMAGE_STATS = (
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "brightness",
    "sharpness",
    "width",
    "height",
)
# Empty bins on one side would make PSI infinite: every share is floored at this.
FLOOR = 1e-4
POLICIES = ("report", "warn", "fail")


@dataclass(frozen=True)
class Comparison:
    feature: str
    group: str  # label | metadata | image | embedding
    psi: float
    test: str  # chi-square | ks | domain-classifier
    statistic: float
    p_value: float | None
    reference: str  # a short description of the reference distribution
    current: str
    drifted: bool = False


@dataclass
class DriftReport:
    reference_version: str
    current_version: str
    threshold: float
    comparisons: list[Comparison] = field(default_factory=list)
    n_reference_images: int = 0
    n_current_images: int = 0

    @property
    def drifted(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.drifted]

    @property
    def detected(self) -> bool:
        return bool(self.drifted)

    def headline(self) -> str:
        if not self.detected:
            return f"no drift against {self.reference_version} (every PSI < {self.threshold:g})"
        parts = ", ".join(f"{c.feature} PSI {c.psi:.2f}" for c in sorted(self.drifted, key=lambda c: -c.psi)[:5])
        return f"drift against {self.reference_version} in {len(self.drifted)} feature(s): {parts}"

    def summary(self) -> dict:
        return {
            "detected": self.detected,
            "reference_version": self.reference_version,
            "threshold": self.threshold,
            "headline": self.headline(),
            "drifted": {c.feature: round(c.psi, 4) for c in self.drifted},
            "max_psi": round(max((c.psi for c in self.comparisons), default=0.0), 4),
        }

    def to_json(self) -> dict:
        return {**self.summary(), "current_version": self.current_version, "comparisons": [
            asdict(c) for c in self.comparisons
        ]}  # fmt: skip


def psi(reference_counts, current_counts) -> float:
    """Population Stability Index of two histograms over the same bins: sum (c - r) * ln(c / r) of the shares."""
    import numpy as np

    r = np.asarray(reference_counts, dtype=float)
    c = np.asarray(current_counts, dtype=float)
    if r.sum() == 0 or c.sum() == 0:
        return 0.0
    r = np.maximum(r / r.sum(), FLOOR)
    c = np.maximum(c / c.sum(), FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def _shares(counts: dict, total: int, limit: int = 4) -> str:
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{k} {100.0 * v / total:.1f}%" for k, v in top) if total else "none"


def categorical(feature: str, group: str, reference, current, threshold: float) -> Comparison:
    """PSI and chi-square of a categorical column (missing values are their own category)."""
    import numpy as np
    from scipy.stats import chi2_contingency

    ref = reference.fillna("(missing)").astype(str).value_counts()
    cur = current.fillna("(missing)").astype(str).value_counts()
    categories = sorted(set(ref.index) | set(cur.index))
    r = np.array([ref.get(k, 0) for k in categories])
    c = np.array([cur.get(k, 0) for k in categories])
    value = psi(r, c)
    if len(categories) > 1 and r.sum() and c.sum():
        chi2, p, _, _ = chi2_contingency(np.vstack([r, c]))
        statistic, p_value = float(chi2), float(p)
    else:
        statistic, p_value = 0.0, 1.0
    return Comparison(
        feature, group, value, "chi-square", statistic, p_value,
        _shares(dict(zip(categories, r.tolist(), strict=True)), int(r.sum())),
        _shares(dict(zip(categories, c.tolist(), strict=True)), int(c.sum())),
        value >= threshold,
    )  # fmt: skip


def numeric(feature: str, group: str, reference, current, threshold: float) -> Comparison:
    """PSI over the reference's deciles and the two-sample KS test of a numeric column (NaN left out)."""
    import numpy as np
    from scipy.stats import ks_2samp

    r = np.asarray(reference, dtype=float)
    c = np.asarray(current, dtype=float)
    r, c = r[np.isfinite(r)], c[np.isfinite(c)]
    if len(r) == 0 or len(c) == 0:
        return Comparison(feature, group, 0.0, "ks", 0.0, None, f"n={len(r)}", f"n={len(c)}")
    inner = np.unique(np.quantile(r, np.linspace(0.1, 0.9, 9)))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    value = psi(np.histogram(r, edges)[0], np.histogram(c, edges)[0])
    test = ks_2samp(r, c)
    return Comparison(
        feature, group, value, "ks", float(test.statistic), float(test.pvalue),
        f"mean {r.mean():.4g}, sd {r.std():.4g}", f"mean {c.mean():.4g}, sd {c.std():.4g}", value >= threshold,
    )  # fmt: skip


def sampled(image_id: str, fraction: float) -> bool:
    """Whether an image is in the stats sample: by a hash of its id, so the same data gives the same sample."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(image_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def image_stats(data: bytes) -> dict | None:
    """The statistics of one image file (None if it does not decode: the validation suites report that)."""
    import numpy as np

    from dermaops.imagefile import open_image

    try:
        with open_image(data, "image") as image:  # over the pixel limit: refused, a validation finding
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except Exception:  # PIL raises many types; an undecodable image is a validation finding, not drift
        return None
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    laplacian = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
        if min(grey.shape) >= 3
        else np.zeros(1, dtype=np.float32)
    )
    means, stds = rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1))
    return {
        "mean_r": float(means[0]), "mean_g": float(means[1]), "mean_b": float(means[2]),
        "std_r": float(stds[0]), "std_g": float(stds[1]), "std_b": float(stds[2]),
        "brightness": float(grey.mean()),
        "sharpness": float(laplacian.var()),
        "width": float(rgb.shape[1]), "height": float(rgb.shape[0]),
    }  # fmt: skip


def image_stats_table(images: Iterable[tuple[str, str, bytes]], n_images: int, max_images: int):
    """A DataFrame of image_stats for a seeded sample of about `max_images` of the `n_images` images."""
    import pandas as pd

    fraction = 1.0 if n_images <= max_images else max_images / n_images
    rows = []
    for image_id, _, data in images:
        if sampled(image_id, fraction) and (stats := image_stats(data)) is not None:
            rows.append({"image_id": image_id, **stats})
    return pd.DataFrame(rows, columns=["image_id", *IMAGE_STATS])


def compare(
    reference_version: str,
    current_version: str,
    ref_metadata,
    cur_metadata,
    ref_stats,
    cur_stats,
    threshold: float = DEFAULT_PSI,
) -> DriftReport:
    """Every comparison of the module docstring, label first."""
    report = DriftReport(reference_version, current_version, threshold)
    report.comparisons.append(categorical("dx", "label", ref_metadata["dx"], cur_metadata["dx"], threshold))
    report.comparisons.append(numeric("age", "metadata", ref_metadata["age"], cur_metadata["age"], threshold))
    for column in METADATA_CATEGORICAL:
        report.comparisons.append(
            categorical(column, "metadata", ref_metadata[column], cur_metadata[column], threshold)
        )
    for column in IMAGE_STATS:
        report.comparisons.append(numeric(column, "image", ref_stats[column], cur_stats[column], threshold))
    report.n_reference_images, report.n_current_images = len(ref_stats), len(cur_stats)
    return report


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "< 1e-300" if value == 0 else f"{value:.3g}"


def render_section(report: DriftReport | None, plot_name: str | None, note: str = "") -> list[str]:
    """The data-quality report's drift section (markdown lines)."""
    lines = ["## Drift against the champion's data", ""]
    if report is None:
        return lines + [note or "No comparison.", ""]
    lines += [
        f"- reference: dataset version `{report.reference_version}` (the champion's training data); "
        f"image statistics on {report.n_reference_images:,} reference and {report.n_current_images:,} new images",
        f"- verdict: **{'DRIFT' if report.detected else 'no drift'}**: {report.headline()}",
        f"- a feature drifts when its PSI >= {report.threshold:g} (below 0.1 stable, 0.1-0.25 moderate, "
        "above 0.25 major); chi-square and Kolmogorov-Smirnov tests for context",
    ]
    if note:
        lines.append(f"- {note}")
    lines += ["", "| group | feature | PSI | test | statistic | p | reference | new | drift |", "|" + "---|" * 9]
    for c in report.comparisons:
        lines.append(
            f"| {c.group} | `{c.feature}` | {c.psi:.3f} | {c.test} | {c.statistic:.3g} | {_p(c.p_value)} | "
            f"{c.reference} | {c.current} | {'**yes**' if c.drifted else 'no'} |"
        )
    if plot_name:
        lines += ["", f"![drift: PSI per feature]({plot_name})"]
    return lines + [""]


def render_plot(report: DriftReport, path: Path) -> Path:
    """A horizontal bar chart of every feature's PSI, drifted ones in red, the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{c.group}: {c.feature}" for c in report.comparisons]
    values = [c.psi for c in report.comparisons]
    colours = ["#C44E52" if c.drifted else "#4C72B0" for c in report.comparisons]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5), dpi=100)
    ax.barh(names, values, color=colours)
    ax.axvline(report.threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {report.threshold:g}")
    ax.invert_yaxis()
    ax.set_xlabel("PSI (new vs reference)")
    ax.set_title(f"Drift of {report.current_version[:16]} vs {report.reference_version[:16]}")
    ax.legend(loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
