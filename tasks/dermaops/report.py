"""The evaluation report: confusion-matrix plots, CSV tables and report.md (markdown that links the
plots by relative path, so it renders next to them in S3 browsers, on GitHub or after a download).
"""

from __future__ import annotations

import io

import numpy as np

from dermaops.checkpoint import CheckpointMeta
from dermaops.dataset import CLASSES
from dermaops.metrics import HEADLINE, format_number, headline

COMPARISON_COLUMNS = HEADLINE
# Rare classes the seed report tracked against the baseline: where a majority-driven model fails.
RECALL_CLASSES = ("mel", "df", "vasc")
# The seed report (image-level split, ResNet50 at 224 px): a yardstick, not a like-for-like comparison.
SEED_REPORT = {"accuracy": 0.7285, "weighted_f1": 0.7486, "macro_f1": 0.5891, "mel_recall": 0.55}
# Row names of the model comparison, in the seed report's order; the evaluated model's is evaluated_label().
BASELINE, FROZEN = "baseline (random forest)", "frozen (phase 1)"


def evaluated_label(meta: CheckpointMeta) -> str:
    """The evaluated checkpoint (cnn.pt) named as it is: the epoch of either phase with the best validation
    macro F1, which is phase 1's when fine-tuning did not improve on it."""
    return f"best on validation (phase {meta.phase}, epoch {meta.epoch})"


def why_chosen(meta: CheckpointMeta, train_config: dict | None) -> str:
    """Why cnn.pt is this checkpoint, in words, from its meta and the train stage's config."""
    score = (meta.val or {}).get("macro_f1")
    said = f"the highest validation macro F1{f' ({score:.4f})' if score is not None else ''} of every epoch trained"
    finetune = (train_config or {}).get("finetune_epochs")
    if meta.phase == 1 and finetune:
        said += (
            f"; phase 2's {finetune} fine-tuning epoch{'s' if finetune != 1 else ''} did not improve on it, so it "
            f"is the {FROZEN} model"
        )
    elif meta.phase == 1:
        said += " (phase 1 only: no fine-tuning epochs)"
    return said


def draw_confusion(path, matrix: np.ndarray, title: str, normalised: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalised else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = (1 if normalised else matrix.max() or 1) / 2
    for (i, j), value in np.ndenumerate(matrix):
        text = f"{value:.2f}" if normalised else str(int(value))
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_row(name: str, metrics: dict) -> dict:
    return {"model": name, **headline(metrics, COMPARISON_COLUMNS, digits=None)}


def to_csv(rows: list[dict]) -> str:
    import pandas as pd

    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False, float_format="%.4f")
    return buffer.getvalue()


def per_class_rows(metrics: dict) -> list[dict]:
    return [{"class": cls, **values} for cls, values in metrics["per_class"].items()]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def recall_rows(models: dict[str, dict]) -> list[list]:
    """[class, recall per model..., change vs baseline of the last (the evaluated) model]."""
    names = list(models)
    rows = []
    for cls in RECALL_CLASSES:
        recalls = [models[name]["per_class"][cls]["recall"] for name in names]
        change = None
        if BASELINE in models and len(names) > 1:
            change = recalls[-1] - models[BASELINE]["per_class"][cls]["recall"]
        rows.append([cls, *recalls, f"{change:+.4f}" if change is not None else "n/a"])
    return rows


def render(
    *,
    run_id: str,
    dataset_version: str,
    split_uri: str,
    split_strategy: str,
    model_uri: str,
    model_meta: CheckpointMeta,
    models: dict[str, dict],
    confusion: np.ndarray,
    gradcam: dict | None,
    promotion: dict | None,
    intervals: dict | None = None,
    n_resamples: int | None = None,
    calibration: dict | None = None,
    operating_point: dict | None = None,
    subgroups: dict | None = None,
    referral: dict | None = None,
    ood: dict | None = None,
    train_config: dict | None = None,
) -> str:
    """report.md. `models` maps a display name to its test metrics, the evaluated model LAST; `intervals`
    the lesion-bootstrap intervals of its headline metrics ({metric: {value, low, high}}); `train_config` the
    train stage's settings (its manifest's config), which say whether the model could have been fine-tuned."""
    name, metrics = list(models.items())[-1]
    intervals = intervals or {}
    out = [
        f"# DermaOps evaluation: run `{run_id}`",
        "",
        f"- dataset version: `{dataset_version}`",
        f"- test split: `{split_uri}` ({metrics['n']} images; strategy `{split_strategy}`)",
        f"- evaluated model, {name}: `{model_uri}` ({model_meta.arch} at "
        f"{model_meta.frame.describe()}); chosen because it has {why_chosen(model_meta, train_config)}",
        "",
        "## Test metrics",
        "",
        _table(
            ["metric", "value", "95 % interval", "seed report (224 px, image-level split)"],
            [
                [k, value, interval_text(intervals.get(k)), SEED_REPORT.get(k)]
                for k, value in headline(metrics, COMPARISON_COLUMNS, digits=None).items()
            ],
        ),
        "",
        f"Intervals: percentile, {n_resamples or 'no'} bootstrap resamples of the test split's LESIONS (all "
        "images of a lesion drawn together).",
        "",
        "## Model comparison",
        "",
        _table(
            ["model", *COMPARISON_COLUMNS],
            [
                [r["model"], *(r[c] for c in COMPARISON_COLUMNS)]
                for r in [comparison_row(n, m) for n, m in models.items()]
            ],
        ),
        "",
        "Recall on the rare classes the seed report tracked (change = evaluated model minus baseline):",
        "",
        _table(["class", *models, "change vs baseline"], recall_rows(models)),
        "",
        "## Per class",
        "",
        _table(
            ["class", "precision", "recall", "f1", "auc (one-vs-rest)", "support"],
            [
                [c, v["precision"], v["recall"], v["f1"], v["auc"], v["support"]]
                for c, v in metrics["per_class"].items()
            ],
        ),
        "",
        "## Confusion matrix",
        "",
        "Rows are the true class, columns the prediction.",
        "",
        _table(
            ["true \\ predicted", *CLASSES], [[c, *row.tolist()] for c, row in zip(CLASSES, confusion, strict=True)]
        ),
        "",
        "![confusion matrix, counts](confusion_matrix.png)",
        "![confusion matrix, row-normalised](confusion_matrix_normalized.png)",
        "",
    ]
    out += _calibration_section(calibration)
    out += _operating_point_section(operating_point)
    out += subgroup_section(subgroups)
    out += referral_section(referral)
    out += ood_section(ood)
    out += _gradcam_section(gradcam)
    out += _promotion_section(promotion)
    return "\n".join(out) + "\n"


def interval_text(entry: dict | None) -> str:
    if not entry or entry.get("low") is None:
        return "n/a"
    return f"[{entry['low']:.4f}, {entry['high']:.4f}]"


def _calibration_section(calibration: dict | None) -> list[str]:
    if calibration is None:
        return []
    lines = ["## Calibration", ""]
    if calibration.get("temperature") is None:
        lines.append(
            f"The checkpoint carries no temperature (trained before calibration was fitted): test ECE "
            f"{calibration['ece_before']:.4f} (15 bins), uncalibrated."
        )
    else:
        fitted = calibration.get("fitted") or {}
        lines += [
            f"Temperature scaling, T = {calibration['temperature']:.4f}, fitted on the validation split "
            f"(validation ECE {format_number(fitted.get('val_ece_before'))} -> "
            f"{format_number(fitted.get('val_ece_after'))}).",
            "",
            _table(
                ["expected calibration error (15 bins), test", "value"],
                [["before temperature scaling", calibration["ece_before"]], ["after", calibration["ece_after"]]],
            ),
        ]
    return lines + ["", "![reliability diagram](reliability.png)", ""]


def _operating_point_section(point: dict | None) -> list[str]:
    lines = ["## Melanoma operating point", ""]
    if point is None:
        return lines + ["The checkpoint carries no mel_threshold: melanoma is flagged when it is the argmax.", ""]
    target = point.get("target_sensitivity")
    return lines + [
        f"Rule: {point['rule']}" + (f", chosen on validation for a target sensitivity of {target}" if target else "")
        + (f" (validation sensitivity {point['val_sensitivity']})" if point.get("val_sensitivity") is not None else "")
        + ".",
        "",
        _table(
            ["on the test split", "value", "95 % interval", "images"],
            [
                ["sensitivity (melanomas flagged)", point["sensitivity"], _pair(point["sensitivity_ci"]),
                 point["n_mel"]],
                ["specificity (others not flagged)", point["specificity"], _pair(point["specificity_ci"]),
                 point["n_other"]],
            ],
        ),
        "",
    ]  # fmt: skip


def _ci(entry: dict) -> str:
    """value [low, high] of a {value, low, high} figure; n/a where undefined."""
    if not entry or entry.get("value") is None:
        return "n/a"
    return f"{entry['value']:.3f}" + (
        f" [{entry['low']:.3f}, {entry['high']:.3f}]" if entry.get("low") is not None else ""
    )


def subgroup_section(subgroups: dict | None) -> list[str]:
    """The subgroup table (dermaops.subgroups): every group, small ones marked."""
    if not subgroups:
        return []
    lines = [
        "## Subgroups",
        "",
        f"Test figures per group of sex, age band, localization (the ten most frequent sites of the dataset, the rest "
        f"as other) and dx_type, each with a 95 % interval from the same {subgroups['resamples']} lesion resamples "
        f"as the headline; melanoma sensitivity and specificity at {subgroups['operating_point']}. Macro F1 "
        f"{subgroups['macro_f1_rule']} (n/a otherwise). **small**: fewer than {subgroups['small_lesions']} test "
        "lesions, its intervals are wide.",
        "",
        "| attribute | group | images | lesions | melanomas | accuracy | balanced accuracy | macro F1 | "
        "mel sensitivity | mel specificity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in subgroups["groups"]:
        name = f"{g['group']} **small**" if g["small"] else g["group"]
        lines.append(
            f"| {g['attribute']} | {name} | {g['n']} | {g['lesions']} | {g['n_mel']} | {_ci(g['accuracy'])} | "
            f"{_ci(g['balanced_accuracy'])} | {_ci(g['macro_f1'])} | {_ci(g['mel_sensitivity'])} | "
            f"{_ci(g['mel_specificity'])} |"
        )
    return [*lines, "", "![melanoma sensitivity by subgroup](subgroups_mel_sensitivity.png)", ""]


def referral_section(referral: dict | None) -> list[str]:
    """Selective prediction (dermaops.selective): the risk-coverage curve and the stored referral threshold."""
    if not referral:
        return []
    lines = [
        "## Referral (selective prediction)",
        "",
        f"Risk-coverage on the test split: images decided from the most confident down (confidence = the largest "
        f"calibrated probability). AURC {referral['aurc']:.4f} (lower is better).",
        "",
    ]
    test = referral.get("test")
    if test is None:
        lines.append(
            "The checkpoint carries no referral threshold (trained before it was fitted): every image is decided."
        )
    else:
        fitted = referral["fitted"]
        unreachable = "" if fitted.get("reachable", True) else "; the target was not reachable: everything is referred"
        lines += [
            f"Referral threshold {test['threshold']:.4f} on the confidence, chosen on validation for a target accuracy "
            f"of {referral['target_accuracy']} (validation coverage {fitted.get('coverage')}, accuracy "
            f"{fitted.get('accuracy')}{unreachable}).",
            "",
            _table(
                ["on the test split", "value", "95 % interval"],
                [
                    ["coverage (share decided)", test["coverage"], _pair(test["coverage_ci"])],
                    ["accuracy of the decided images", test["accuracy"], _pair(test["accuracy_ci"])],
                    ["decided / referred images", f"{test['decided']} / {test['referred']}", ""],
                    ["coverage at the target on the test curve itself (not used: chosen on test)",
                     referral.get("test_coverage_at_target_on_test"), ""],
                ],
            ),
        ]  # fmt: skip
    return [*lines, "", "![risk-coverage curve](risk_coverage.png)", ""]


def ood_section(ood: dict | None) -> list[str]:
    """Inputs unlike the training data (dermaops.ood): false flags on test, detection of corrupted copies."""
    if ood is None:
        return [
            "## Out-of-distribution inputs",
            "",
            "The checkpoint carries no out-of-distribution detector (trained before it was fitted).",
            "",
        ]
    fitted = ood["fitted"]
    false_flags = [f"in distribution ({ood['n_test']}, false flags)", ood["false_flag_rate"]]
    detected = [[f"{kind} ({ood['corruptions'][kind]}), detected", rate, ""] for kind, rate in ood["detection"].items()]
    return [
        "## Out-of-distribution inputs",
        "",
        f"{fitted['method']} on the {fitted['dim']} penultimate-layer features ({fitted['layer']}), fitted on "
        f"{fitted['n_train']} training images; threshold {ood['threshold']:.2f} chosen on {fitted['n_val']} validation "
        f"images for a {fitted['tpr']:.0%} true-in-distribution rate. Images past it are flagged `out_of_distribution` "
        "by predict and get no diagnosis.",
        "",
        _table(
            ["test images", "flagged", "95 % interval"],
            [[*false_flags, _pair(ood["false_flag_rate_ci"])], *detected],
        ),
        "",
    ]  # fmt: skip


def _pair(pair) -> str:
    return "n/a" if not pair or pair[0] is None else f"[{pair[0]:.4f}, {pair[1]:.4f}]"


def _gradcam_section(gradcam: dict | None) -> list[str]:
    if not gradcam:
        return ["## Grad-CAM", "", "No melanoma image in the test split (or --no-gradcam): no Grad-CAM.", ""]
    h, w = gradcam["map_size"]
    lines = [
        "## Grad-CAM against the lesion masks",
        "",
        f"Target layer `{gradcam['layer']}` ({h}x{w} map), chosen as the deepest convolutional layer whose map is "
        f"at least 6x6 at the trained size. Each test image's map is that of its true class, judged against "
        f"its lesion mask ({gradcam['mask_source']}): the energy ratio is the share of the map's mass inside "
        "the mask divided by the mask's share of the image (1 = no better than uniform), the pointing game "
        f"counts a hit when the map's maximum lies in the mask dilated by {gradcam['pointing_tolerance_px']} px.",
        "",
        "| class | images | energy ratio (mean) | energy ratio (median) | pointing-game hit rate |",
        "|---|---|---|---|---|",
    ]
    for name, row in {**gradcam["per_class"], "all": gradcam["overall"]}.items():
        lines.append(
            f"| {name} | {row['n']} | {format_number(row['energy_ratio'])} | "
            f"{format_number(row['energy_ratio_median'])} | {format_number(row['pointing_hit_rate'])} |"
        )
    return [
        *lines,
        "",
        f"{len(gradcam['image_ids'])} melanomas, spread from the highest to the lowest predicted melanoma "
        "probability, each beside its Grad-CAM map of the `mel` score (red = regions that raise it), with the "
        "lesion's outline in white and the map's maximum as a cross:",
        "",
        "![Grad-CAM grid](gradcam_mel.png)",
        "",
    ]


def _promotion_section(promotion: dict | None) -> list[str]:
    if promotion is None:
        return ["## Promotion", "", "No --registry given: the champion/challenger gate was not run.", ""]
    lines = [
        "## Promotion (champion/challenger)",
        "",
        f"- decision: **{promotion['decision']}**",
        f"- reason: {promotion['reason']}",
        f"- primary metric: `{promotion['primary_metric']}`, margin {promotion['promotion_margin']}, "
        f"melanoma recall floor {promotion['mel_recall_floor']}",
        f"- champion now: `{promotion['champion_uri']}`",
        *(
            [
                f"- paired lesion bootstrap, challenger minus champion ({paired['metric']}): "
                f"{paired['difference']:+.4f}, 95 % interval [{paired['low']:+.4f}, {paired['high']:+.4f}]"
            ]
            if (paired := promotion.get("paired_bootstrap")) and paired.get("low") is not None
            else []
        ),
        f"- decision record: `{promotion['history_uri']}`",
    ]
    before = promotion.get("champion_before")
    if before and before.get("rescored"):
        rescored = before["rescored"]
        lines += [
            "",
            f"Champion before this run (run `{before['run_id']}`), re-scored on this test split:",
            "",
            _table(
                ["metric", "champion", "challenger"],
                [[k, rescored.get(k), promotion["challenger"]["metrics"].get(k)] for k in COMPARISON_COLUMNS],
            ),
        ]
    elif before and before.get("problem"):
        run = before.get("run_id", "unknown")
        lines += ["", f"The registered champion (run `{run}`) could not be re-scored: {before['problem']}"]
    return lines + [""]
