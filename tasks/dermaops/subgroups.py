"""Performance in subgroups of the test split: sex, age band, localization and dx_type.

Groups:
- sex: as recorded (male, female, unknown);
- age band: < 30, 30-49, 50-69, >= 70, unknown (no age recorded);
- localization: the ten most frequent sites of the dataset version (all its images, so the groups are the
  same for every run on that version), every other site as "other";
- dx_type: how the diagnosis was confirmed (histo, follow_up, consensus, confocal).

For each group: images, lesions, melanomas, accuracy, balanced accuracy (mean recall over the classes
present), macro F1 over the seven classes only where every class has support in the group (a group
without dermatofibromas has an F1 of 0 for df by the headline's convention, which says nothing about the
group), and melanoma sensitivity and specificity at the model's operating point (its `mel_threshold`,
else the argmax rule). Each figure has a 95 % interval from the SAME lesion bootstrap as the headline
figures (dermaops.bootstrap.Resamples over the whole test split, the figure computed on the group's images
in each resample), so a group's interval is as wide as its few lesions make it. Groups with fewer than
SMALL_LESIONS test lesions are marked small: shown, never hidden.

The subgroup gate (evaluate's --subgroup-gate, dermaops.promotion) compares the challenger's melanoma
sensitivity with the re-scored champion's in every group with at least --subgroup-min-melanomas test
melanomas, by a paired bootstrap on the same resamples (each model at its own operating point): a group
whose 95 % interval of the difference lies wholly below 0 refuses the challenger, and the decision names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTRIBUTES = ("sex", "age_band", "localization", "dx_type")
AGE_BANDS = ("< 30", "30-49", "50-69", ">= 70")
UNKNOWN, OTHER = "unknown", "other"
TOP_LOCALIZATIONS = 10
SMALL_LESIONS = 30  # fewer test lesions than this: the group is marked small
FIGURES = ("accuracy", "balanced_accuracy", "macro_f1", "mel_sensitivity", "mel_specificity")


def age_band(age) -> str:
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return UNKNOWN
    for band, upper in zip(AGE_BANDS, (30, 50, 70, None), strict=True):
        if upper is None or age < upper:
            return band
    return UNKNOWN  # unreachable: the last band has no upper bound


def largest_localizations(metadata, count: int = TOP_LOCALIZATIONS) -> list[str]:
    """The `count` most frequent localizations of a dataset's metadata (ties by name)."""
    counts = metadata["localization"].fillna(UNKNOWN).astype(str).value_counts()
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked[:count]]


def group_labels(test, localizations: list[str]) -> dict[str, np.ndarray]:
    """attribute -> each test image's group (a string), for the four attributes."""

    def column(name: str) -> np.ndarray:
        if name not in test.columns:
            return np.full(len(test), UNKNOWN, dtype=object)
        return test[name].fillna(UNKNOWN).astype(str).to_numpy(dtype=object)

    sites = column("localization")
    return {
        "sex": column("sex"),
        "age_band": np.array(
            [age_band(a) for a in (test["age"] if "age" in test.columns else [None] * len(test))], dtype=object
        ),  # fmt: skip
        "localization": np.where(np.isin(sites, localizations), sites, OTHER).astype(object),
        "dx_type": column("dx_type"),
    }


def _order(attribute: str, groups: np.ndarray, localizations: list[str]) -> list[str]:
    present = set(groups.tolist())
    if attribute == "age_band":
        wanted = [*AGE_BANDS, UNKNOWN]
    elif attribute == "localization":
        wanted = [*localizations, OTHER]
    else:
        wanted = sorted(present - {UNKNOWN}) + [UNKNOWN]
    return [g for g in wanted if g in present]


def _flag_counts(weights: np.ndarray, is_mel: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, specificity) of the melanoma flag per weight row; NaN where a row has no such image."""
    columns = np.stack([is_mel, ~is_mel, flagged & is_mel, ~flagged & ~is_mel], axis=1).astype(weights.dtype)
    mel_w, other_w, caught, cleared = (weights @ columns).astype(np.float64).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return caught / mel_w, cleared / other_w


def _entry(value: float | None, samples: np.ndarray | None) -> dict:
    from dermaops.bootstrap import interval

    if value is None or (isinstance(value, float) and np.isnan(value)):
        return {"value": None, "low": None, "high": None}
    low, high = interval(samples) if samples is not None else (None, None)
    return {"value": float(value), "low": low, "high": high}


@dataclass
class Subgroups:
    """The test split's groups and the lesion bootstrap they share with the headline figures."""

    labels: np.ndarray  # (N,) true class indices
    lesions: np.ndarray  # (N,) lesion id per image
    groups: dict[str, np.ndarray]  # attribute -> (N,) group per image
    localizations: list[str]
    weights: np.ndarray  # (B, N) lesion-bootstrap weights (dermaops.bootstrap.Resamples.weights)
    mel: int
    n_classes: int

    def members(self):
        """(attribute, group, image indices) in report order."""
        for attribute in ATTRIBUTES:
            values = self.groups[attribute]
            for group in _order(attribute, values, self.localizations):
                yield attribute, group, np.flatnonzero(values == group)

    def figures(self, proba: np.ndarray, flagged: np.ndarray, rule: str) -> dict:
        """Every group's figures with intervals: the `subgroups` entry of the test metrics."""
        from dermaops.bootstrap import resample_metrics

        proba = np.asarray(proba)
        is_mel = self.labels == self.mel
        rows = []
        for attribute, group, idx in self.members():
            labels, p = self.labels[idx], proba[idx]
            point = resample_metrics(np.ones((1, len(idx))), labels, p, self.mel, with_auc=False)
            # A resample that drew none of the group's lesions has no figure (NaN, left out of the interval).
            with np.errstate(invalid="ignore", divide="ignore"):
                samples = resample_metrics(self.weights[:, idx], labels, p, self.mel, with_auc=False)
            sens, spec = _flag_counts(np.ones((1, len(idx))), is_mel[idx], flagged[idx])
            sens_b, spec_b = _flag_counts(self.weights[:, idx], is_mel[idx], flagged[idx])
            support = np.bincount(labels, minlength=self.n_classes)
            every_class = bool((support > 0).all())
            n_lesions = int(len(np.unique(self.lesions[idx])))
            rows.append(
                {
                    "attribute": attribute,
                    "group": group,
                    "n": int(len(idx)),
                    "lesions": n_lesions,
                    "n_mel": int(is_mel[idx].sum()),
                    "small": n_lesions < SMALL_LESIONS,
                    "accuracy": _entry(point["accuracy"][0], samples["accuracy"]),
                    "balanced_accuracy": _entry(point["balanced_accuracy"][0], samples["balanced_accuracy"]),
                    "macro_f1": _entry(point["macro_f1"][0] if every_class else None, samples["macro_f1"]),
                    "mel_sensitivity": _entry(sens[0], sens_b),
                    "mel_specificity": _entry(spec[0], spec_b),
                }
            )
        return {
            "attributes": list(ATTRIBUTES),
            "localizations": self.localizations,
            "operating_point": rule,
            "small_lesions": SMALL_LESIONS,
            "resamples": int(self.weights.shape[0]),
            "macro_f1_rule": "only where every class has support in the group",
            "groups": rows,
        }

    def compare(self, flagged_a: np.ndarray, flagged_b: np.ndarray, min_melanomas: int) -> list[dict]:
        """Paired lesion bootstrap of melanoma sensitivity, a (challenger) minus b (champion), in every group with
        at least `min_melanomas` melanomas; `worse` when the interval's upper bound is below 0."""
        from dermaops.bootstrap import LEVEL, interval

        is_mel = self.labels == self.mel
        out = []
        for attribute, group, idx in self.members():
            n_mel = int(is_mel[idx].sum())
            if n_mel < min_melanomas:
                continue
            ones = np.ones((1, len(idx)))
            a, b = (
                _flag_counts(ones, is_mel[idx], flagged_a[idx])[0][0],
                _flag_counts(ones, is_mel[idx], flagged_b[idx])[0][0],
            )
            diff = (
                _flag_counts(self.weights[:, idx], is_mel[idx], flagged_a[idx])[0]
                - _flag_counts(self.weights[:, idx], is_mel[idx], flagged_b[idx])[0]
            )
            low, high = interval(diff, LEVEL)
            out.append(
                {
                    "attribute": attribute,
                    "group": group,
                    "n_mel": n_mel,
                    "challenger": round(float(a), 4),
                    "champion": round(float(b), 4),
                    "difference": round(float(a - b), 4),
                    "low": low,
                    "high": high,
                    "worse": high is not None and high < 0,
                }
            )
        return out


def verdict(compared: list[dict], min_melanomas: int) -> str | None:
    """The subgroup gate's refusal naming the worst group, or None when no judged group is worse."""
    worse = [c for c in compared if c["worse"]]
    if not worse:
        return None
    c = min(worse, key=lambda c: c["high"])
    others = f" (and {len(worse) - 1} more group(s))" if len(worse) > 1 else ""
    return (
        f"subgroup gate: melanoma sensitivity in {c['attribute']} = {c['group']} ({c['n_mel']} test melanomas) is "
        f"{c['challenger']:.4f} against the champion's {c['champion']:.4f} (re-scored on this test split): paired "
        f"lesion bootstrap of the difference {c['difference']:+.4f}, 95 % interval [{c['low']:+.4f}, "
        f"{c['high']:+.4f}], wholly below 0{others}; groups judged: those with at least {min_melanomas} test melanomas"
    )


def draw_forest(path, figures: dict, overall: dict | None, title: str) -> None:
    """PNG: melanoma sensitivity per group with its 95 % interval, grouped by attribute; small groups hollow,
    groups without a melanoma listed with none; the overall sensitivity as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = figures["groups"]
    fig, ax = plt.subplots(figsize=(7.2, 0.28 * (len(rows) + len(figures["attributes"])) + 1.4))
    y, ticks, labels = 0, [], []
    colors = dict(zip(ATTRIBUTES, ("tab:blue", "tab:orange", "tab:green", "tab:purple"), strict=True))
    for attribute in figures["attributes"]:
        ticks.append(y)
        labels.append(f"{attribute}")
        y += 1
        for row in (r for r in rows if r["attribute"] == attribute):
            s = row["mel_sensitivity"]
            mark = " (small)" if row["small"] else ""
            ticks.append(y)
            labels.append(f"  {row['group']}: {row['n_mel']} mel / {row['lesions']} lesions{mark}")
            if s["value"] is not None:
                color = colors[attribute]
                if s["low"] is not None:
                    ax.plot([s["low"], s["high"]], [y, y], color=color, linewidth=1.5)
                ax.plot([s["value"]], [y], "o", color=color, markerfacecolor="white" if row["small"] else color)
            else:
                ax.text(0.01, y, "no melanoma", va="center", fontsize=7, color="grey")
            y += 1
    if overall and overall.get("value") is not None:
        ax.axvline(overall["value"], color="black", linestyle="--", linewidth=1,
                   label=f"whole test split {overall['value']:.3f}")  # fmt: skip
        ax.legend(fontsize=7, loc="lower left")
    ax.set_yticks(ticks, labels, fontsize=7)
    for tick, label in zip(ax.get_yticklabels(), labels, strict=True):
        if not label.startswith("  "):
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    label = f"melanoma sensitivity, 95 % lesion-bootstrap interval\nflag: {figures['operating_point']}"
    ax.set_xlabel(label, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_rows(figures: dict) -> list[dict]:
    """subgroups.csv: one row per group, each figure with its interval in two more columns."""
    rows = []
    for g in figures["groups"]:
        row = {k: g[k] for k in ("attribute", "group", "n", "lesions", "n_mel", "small")}
        for name in FIGURES:
            row |= {name: g[name]["value"], f"{name}_low": g[name]["low"], f"{name}_high": g[name]["high"]}
        rows.append(row)
    return rows
