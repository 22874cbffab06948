"""The model card of a promoted model: `model_card.json` (the facts) and `model_card.md` (for people),
written by promotion beside the model's immutable copy, `<registry>/models/<run_id>-<sha12>/`.

Sections follow Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019): model details,
intended use, factors, metrics, evaluation data, training data, quantitative analyses, ethical
considerations, caveats and recommendations; plus the registry's decision history for this model.

Facts are taken from where they already live, never re-derived: the checkpoint's meta (architecture,
input size, calibration), the train stage's manifest (the recipe: its `config`), the split stage's
manifest (strategy, seed, counts), the test metrics the promotion gate decided on, and the registry
history. Optional facts are shown when the producing stage records them, under these keys:

- calibration: `temperature` in the checkpoint meta (dermaops.checkpoint.CheckpointMeta; temperature
  scaling); `logit_bias` (the validation-fitted logit adjustment of `train --calibrate`); `ece` in the test metrics;
- melanoma operating point: `mel_threshold` in the checkpoint meta (a threshold on p(mel));
  `mel_operating_point` in the test metrics ({threshold, sensitivity, specificity, ...});
- intervals: any metric `<name>` with a sibling `<name>_ci` = [low, high] (headline or per class);
- where the model looks: `localization` in the test metrics (Grad-CAM of each image's true class
  against its lesion mask: per class the energy ratio and the pointing-game hit rate);
- subgroups: `subgroups` in the test metrics (dermaops.subgroups: per group of sex, age band,
  localization and dx_type, figures with intervals);
- referral: `referral` in the test metrics (dermaops.selective: the stored threshold's test coverage and
  accuracy of the decided images);
- inputs unlike the training data: `ood` in the test metrics (dermaops.ood: false flags on test, detection
  of corrupted images).
"""

from __future__ import annotations

import logging
from typing import Any

from dermaops.checkpoint import CheckpointMeta
from dermaops.config import StageConfig, TrainConfig
from dermaops.errors import StageError, TransientError
from dermaops.metrics import operating_point_line
from dermaops.store import ArtifactStore, S3Uri

CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"
CARD_VERSION = 1
HISTORY_ROWS = 50
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc")
PER_CLASS = ("precision", "recall", "f1", "auc", "support")
CLASS_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
INTENDED_USE = (
    "Research and decision support: ranking and triaging dermatoscopic images of pigmented skin lesions "
    "into the seven HAM10000 diagnostic categories, for review by a qualified clinician."
)
OUT_OF_SCOPE = [
    "Diagnosis, or any clinical decision, without a clinician: the model's output is a second opinion for a "
    "dermatologist who examines the patient, never a diagnosis.",
    "Clinical (non-dermatoscopic) photographs, smartphone pictures, histopathology, or lesions outside the "
    "seven HAM10000 categories (e.g. squamous cell carcinoma other than akiec, non-pigmented lesions).",
    "Screening populations unlike HAM10000's (see Factors): its performance there is unknown.",
]
LIMITATIONS = [
    "Resolution: the model sees each image as {frame} (the originals are 600x450); fine structures a "
    "dermatologist relies on are lost at that size.",
    "Population: HAM10000 comes from two sites (Vienna, Austria and Queensland, Australia) and mostly fair "
    "skin (Fitzpatrick I-III); skin types V-VI are barely represented, and performance on them is unknown.",
    "No external validation: every figure here is on a held-out split of the same dataset (same sites, "
    "devices and labelling process); expect lower performance elsewhere.",
    "Label quality: about half of the HAM10000 labels come from histopathology, the rest from follow-up, "
    "expert consensus or confocal microscopy.",
    "Class imbalance: nevi are 67 % of the data and dermatofibroma 1.2 %; rare-class figures rest on few "
    "test images and are uncertain.",
]

log = logging.getLogger(__name__)


def recipe_of(config: dict, config_type: type[StageConfig] = TrainConfig) -> dict | None:
    """The recipe section: each setting of the train stage's config that can change the model
    (TrainConfig.recipe_fields), as its manifest recorded it; None when the manifest is gone."""
    return {k: config[k] for k in config_type.recipe_fields() if k in config} or None


def _optional_json(store: ArtifactStore, uri: S3Uri) -> dict | None:
    """A stage's manifest if it is still there (run prefixes are working areas and may be gone)."""
    try:
        return store.get_json(uri) if store.exists(uri) else None
    except TransientError:
        raise
    except StageError as exc:
        log.warning("model card: cannot read %s (%s); the card leaves its facts out", uri, exc)
        return None


def _with_ci(metrics: dict, name: str) -> dict:
    out: dict[str, Any] = {"value": metrics.get(name)}
    ci = metrics.get(f"{name}_ci")
    if isinstance(ci, list | tuple) and len(ci) == 2:
        out["ci95"] = [float(ci[0]), float(ci[1])]
    return out


def build_card(
    *,
    run_id: str,
    model_uri: str,
    model_sha256: str,
    meta: CheckpointMeta,
    metrics: dict,
    dataset_version: str,
    split_uri: str,
    decision: dict,
    history: list[dict],
    train_manifest: dict | None,
    split_manifest: dict | None,
) -> dict:
    """The card's facts as one JSON-able dict (pure: no I/O)."""
    from dermaops.predictor import operating_point

    config = (train_manifest or {}).get("config") or {}
    split_summary = (split_manifest or {}).get("summary") or {}
    frame = meta.frame
    # The checkpoint's own rule, as the Predictor applies it (champion.json may move it later: predict reads that).
    point = operating_point(meta, None)
    per_class = {
        cls: {name: _with_ci(values, name) for name in PER_CLASS if name in values}
        for cls, values in (metrics.get("per_class") or {}).items()
    }
    calibration = {
        "temperature": meta.temperature,
        "logit_adjustment": meta.logit_bias is not None,
        "ece": metrics.get("ece"),
    }
    fitted = meta.calibration or {}
    operating = {
        "mel_threshold": meta.mel_threshold,
        "target_sensitivity": fitted.get("mel_target_sensitivity"),
        "validation": {
            "sensitivity": fitted.get("val_mel_sensitivity"),
            "specificity": fitted.get("val_mel_specificity"),
        },
        "test": metrics.get("mel_operating_point"),
        "rule": (
            f"flag melanoma when p(mel) >= {point.threshold}"
            if point.threshold is not None
            else "no stored threshold: melanoma is flagged when it is the most probable class"
        ),
    }
    return {
        "card_version": CARD_VERSION,
        "model_details": {
            "name": f"DermaOps HAM10000 classifier, run {run_id}",
            "model_uri": model_uri,
            "model_sha256": model_sha256,
            "architecture": meta.arch,
            "input": f"{frame.describe()} RGB, ImageNet mean/std normalisation",
            "stem": meta.stem,
            "initial_weights": meta.pretrained,
            "checkpoint": {"phase": meta.phase, "epoch": meta.epoch},
            "classes": {cls: CLASS_NAMES.get(cls, cls) for cls in meta.classes},
            "promoted_at": decision.get("decided_at"),
        },
        "intended_use": {"primary": INTENDED_USE, "out_of_scope": OUT_OF_SCOPE},
        "factors": {
            "relevant": ["diagnostic category", "anatomic site", "age", "sex", "skin type", "imaging device"],
            "evaluated": ["diagnostic category (per-class metrics below)"]
            + (
                ["sex, age band, anatomic site, diagnosis confirmation (subgroup table below)"]
                if metrics.get("subgroups")
                else []
            ),
        },
        "data": {
            "dataset": "HAM10000 (Tschandl et al. 2018, doi:10.7910/DVN/DBW86T), CC BY-NC 4.0",
            "dataset_version": dataset_version,
            "split_uri": split_uri,
            "split_strategy": split_summary.get("strategy"),
            "split_seed": split_summary.get("seed"),
            "split_counts": split_summary.get("counts"),
        },
        "recipe": recipe_of(config),
        "metrics": {
            "split": "test",
            "n": metrics.get("n"),
            "headline": {name: _with_ci(metrics, name) for name in HEADLINE},
            "per_class": per_class,
        },
        "calibration": calibration,
        "melanoma_operating_point": operating,
        "localization": metrics.get("localization"),
        "subgroups": metrics.get("subgroups"),
        "referral": _referral(metrics.get("referral")),
        "out_of_distribution": {k: v for k, v in ood.items() if k != "fitted"} if (ood := metrics.get("ood")) else None,
        "limitations": [item.format(frame=frame.describe() if frame else "a fixed size") for item in LIMITATIONS],
        "ethical_considerations": [
            "Missing a melanoma is the costly error: promotion requires a minimum melanoma recall, and the "
            "operating point above says how the melanoma flag is set.",
            "Performance may differ across skin types, ages and sites not represented in the data.",
            "HAM10000 is licensed for non-commercial use only.",
        ],
        "decision": {
            k: decision.get(k)
            for k in (
                "decision",
                "reason",
                "primary_metric",
                "promotion_margin",
                "mel_recall_floor",
                "champion_before",
                "decided_at",
                "approval",  # the reviewer's answer, when the DAG's require_approval asked for one
            )
        },  # fmt: skip
        # Every decision the registry recorded up to this promotion (the last HISTORY_ROWS): what this
        # model replaced and which challengers were refused before it.
        "decision_history": [
            {k: h.get(k) for k in ("decided_at", "run_id", "decision", "reason")}
            | {"this_model": h.get("challenger", {}).get("model_sha256") == model_sha256}
            for h in (history or [decision])[-HISTORY_ROWS:]
        ],
    }


def _referral(referral: dict | None) -> dict | None:
    """The referral facts a card states: the threshold, its target, the test coverage and decided accuracy."""
    if not referral or not referral.get("test"):
        return None
    test = referral["test"]
    return {
        "threshold": test["threshold"],
        "target_accuracy": referral.get("target_accuracy"),
        "coverage": test["coverage"],
        "coverage_ci95": test.get("coverage_ci"),
        "accuracy_of_decided": test["accuracy"],
        "accuracy_of_decided_ci95": test.get("accuracy_ci"),
        "aurc": referral.get("aurc"),
    }


def _guard_lines(card: dict) -> list[str]:
    """Subgroups, referral and out-of-distribution inputs, where the evaluation recorded them."""
    from dermaops.report import _ci, _pair

    lines = []
    sub = card.get("subgroups")
    if sub:
        lines += [
            "",
            "## Subgroups (test split)",
            "",
            f"Melanoma sensitivity and specificity at {sub['operating_point']}; 95 % lesion-bootstrap intervals; "
            f"small = fewer than {sub['small_lesions']} test lesions.",
            "",
            "| attribute | group | images | melanomas | accuracy | balanced accuracy | mel sensitivity "
            "| mel specificity |",
            "|---|---|---|---|---|---|---|---|",
            *[
                f"| {g['attribute']} | {g['group']}{' (small)' if g['small'] else ''} | {g['n']} | {g['n_mel']} | "
                f"{_ci(g['accuracy'])} | {_ci(g['balanced_accuracy'])} | {_ci(g['mel_sensitivity'])} | "
                f"{_ci(g['mel_specificity'])} |"
                for g in sub["groups"]
            ],
        ]
    ref = card.get("referral")
    lines += ["", "## Referral to a clinician", ""]
    if ref:
        lines.append(
            f"- Images whose confidence (largest calibrated probability) is below {ref['threshold']:.4f} are referred "
            f"instead of diagnosed (threshold chosen on validation for an accuracy of {ref['target_accuracy']}). On "
            f"the test split: coverage {_num(ref['coverage'])} {_pair(ref['coverage_ci95'])} of the images are "
            f"decided, with accuracy {_num(ref['accuracy_of_decided'])} {_pair(ref['accuracy_of_decided_ci95'])} on "
            f"them; AURC {_num(ref['aurc'])}."
        )
    else:
        lines.append("- No referral threshold: every image gets a prediction.")
    ood = card.get("out_of_distribution")
    lines += ["", "## Inputs unlike the training data", ""]
    if ood:
        detection = ", ".join(f"{kind} {rate:.3f}" for kind, rate in ood["detection"].items())
        lines.append(
            f"- Images whose features lie beyond the Mahalanobis threshold {ood['threshold']:.2f} are flagged "
            f"out_of_distribution and get no diagnosis. On the test split {_num(ood['false_flag_rate'])} of genuine "
            f"images are flagged; corrupted copies detected: {detection}."
        )
    else:
        lines.append("- No out-of-distribution detector: every image gets a prediction, whatever it shows.")
    return lines


def _num(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(entry: dict) -> str:
    text = _num(entry.get("value"))
    if "ci95" in entry:
        text += f" [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]"
    return text


def _per_class_heading(per_class: dict) -> str:
    """ "Per class:", naming the figures that carry a 95 % interval (evaluate bootstraps melanoma recall only;
    the others are point estimates on few images of the rare classes)."""
    with_ci = [f"{name} of {cls}" for cls, values in per_class.items() for name, e in values.items() if "ci95" in e]
    if not with_ci:
        return "Per class (point estimates):"
    named = ", ".join(with_ci)
    return f"Per class (95 % lesion-bootstrap interval in brackets for {named}; the rest are point estimates):"


def _approval_text(approval: dict | None) -> str:
    if not approval:
        return ""
    comment = f": {approval['comment']}" if approval.get("comment") else ""
    return f", approved by {approval.get('reviewer')} ({approval.get('responded_at') or 'time not recorded'}){comment}"


def _localization_lines(found: dict | None) -> list[str]:
    if not found:
        return []
    lines = [
        "",
        "## Where the model looks (Grad-CAM against the lesion masks, test split)",
        "",
        f"Each image's Grad-CAM map of its true class ({found['layer']}) against its lesion mask "
        f"({found['mask_source']}): energy ratio = share of the map inside the mask / the mask's share of the "
        f"image (1 = uniform); pointing game = the map's maximum inside the mask dilated by "
        f"{found['pointing_tolerance_px']} px.",
        "",
        "| class | images | energy ratio | pointing-game hit rate |",
        "|---|---|---|---|",
    ]
    for name, row in {**found["per_class"], "all": found["overall"]}.items():
        lines.append(f"| {name} | {row['n']} | {_num(row['energy_ratio'])} | {_num(row['pointing_hit_rate'])} |")
    return lines


def render_card(card: dict) -> str:
    """model_card.md from the card's facts."""
    d, data, m = card["model_details"], card["data"], card["metrics"]
    lines = [
        f"# Model card: {d['name']}",
        "",
        "> **Not for diagnosis without a clinician.** This model supports a dermatologist's review of "
        "dermatoscopic images; it does not diagnose.",
        "",
        "## Model details",
        "",
        f"- Architecture: {d['architecture']} ({d['stem']} stem), input {d['input']}",
        f"- Initial weights: {d['initial_weights']}; checkpoint of phase {d['checkpoint']['phase']}, "
        f"epoch {d['checkpoint']['epoch']}",
        f"- Stored at `{d['model_uri']}` (sha256 `{d['model_sha256']}`)",
        f"- Promoted at {d['promoted_at']}" + _approval_text(card["decision"].get("approval")),
        "- Classes: " + "; ".join(f"`{k}` {v}" for k, v in d["classes"].items()),
        "",
        "## Intended use",
        "",
        card["intended_use"]["primary"],
        "",
        "Out of scope:",
        "",
        *[f"- {item}" for item in card["intended_use"]["out_of_scope"]],
        "",
        "## Factors",
        "",
        f"- Relevant: {', '.join(card['factors']['relevant'])}",
        f"- Evaluated here: {', '.join(card['factors']['evaluated'])}",
        "",
        "## Training and evaluation data",
        "",
        f"- {data['dataset']}",
        f"- Dataset version `{data['dataset_version']}`",
        f"- Split `{data['split_uri']}`: strategy {data['split_strategy'] or 'not recorded'}, "
        f"seed {_num(data['split_seed'])}, counts {data['split_counts'] or 'not recorded'}",
        "",
        "## Recipe",
        "",
    ]
    recipe = card["recipe"]
    lines += (
        [f"- {k}: {v}" for k, v in recipe.items()] if recipe else ["Not recorded (the run's train manifest is gone)."]
    )
    lines += [
        "",
        f"## Metrics (test split, n = {m['n']})",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {_cell(entry)} |" for name, entry in m["headline"].items()],
        "",
        _per_class_heading(m["per_class"]),
        "",
        "| class | " + " | ".join(PER_CLASS) + " |",
        "|---|" + "---|" * len(PER_CLASS),
    ]
    for cls, values in m["per_class"].items():
        lines.append(f"| {cls} | " + " | ".join(_cell(values.get(k, {})) for k in PER_CLASS) + " |")
    cal, op = card["calibration"], card["melanoma_operating_point"]
    lines += [
        "",
        "## Calibration",
        "",
        f"- Temperature scaling: {_num(cal['temperature']) if cal['temperature'] is not None else 'none'}",
        f"- Logit adjustment (validation-fitted): {'yes' if cal['logit_adjustment'] else 'no'}",
        f"- Expected calibration error (test): {_num(cal['ece'])}",
        "",
        "## Melanoma operating point",
        "",
        f"- Rule: {op['rule']}",
    ]
    val = op.get("validation") or {}
    if val.get("sensitivity") is not None:
        target = op.get("target_sensitivity")
        lines.append(
            f"- On the validation split, where it was chosen{f' for sensitivity {target}' if target else ''}: "
            f"sensitivity {_num(val['sensitivity'])}, specificity {_num(val.get('specificity'))}"
        )
    if op["test"]:
        lines.append(f"- On the test split: {operating_point_line(op['test'])}")
    lines += _localization_lines(card.get("localization"))
    lines += _guard_lines(card)
    lines += [
        "",
        "## Caveats and known limitations",
        "",
        *[f"- {item}" for item in card["limitations"]],
        "",
        "## Ethical considerations",
        "",
        *[f"- {item}" for item in card["ethical_considerations"]],
        "",
        "## Decision history",
        "",
        "| decided at | run | decision | reason |",
        "|---|---|---|---|",
        *[
            f"| {h['decided_at']} | {h['run_id']}{' (this model)' if h['this_model'] else ''} | {h['decision']} "
            f"| {str(h['reason']).replace('|', '/')} |"
            for h in card["decision_history"]
        ],
        "",
    ]
    return "\n".join(lines)


def write_model_card(registry, challenger, entry: dict, model_uri: S3Uri, sha256: str) -> S3Uri:
    """Write model_card.json and model_card.md beside the promoted checkpoint; returns the .md URI.
    `registry` is a promotion.Registry, `challenger` a promotion.Challenger, `entry` the decision
    record just appended to the history."""
    store = registry.store
    source = S3Uri.parse(challenger.source_uri)
    train_manifest = _optional_json(store, S3Uri(source.bucket, source.key.rsplit("/", 1)[0]).join("manifest.json"))
    split_manifest = _optional_json(store, S3Uri.parse(challenger.split_uri).join("manifest.json"))
    card = build_card(
        run_id=challenger.run_id,
        model_uri=str(model_uri),
        model_sha256=sha256,
        meta=challenger.meta,
        metrics=challenger.metrics,
        dataset_version=challenger.dataset_version,
        split_uri=challenger.split_uri,
        decision=entry,
        history=registry.history(),
        train_manifest=train_manifest,
        split_manifest=split_manifest,
    )
    folder = S3Uri(model_uri.bucket, model_uri.key.rsplit("/", 1)[0])
    store.put_json(folder.join(CARD_JSON), card)
    return store.put_bytes(folder.join(CARD_MD), render_card(card).encode(), "text/markdown; charset=utf-8")
