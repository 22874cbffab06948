"""Batch prediction: run a stored model on a folder of new dermatoscopic JPEGs.

--model is `champion` (resolved through --registry's champion.json, checksum-verified) or an s3://
URI of a checkpoint or of a prefix holding cnn.pt. --images is a local folder, a zip, or an s3://
prefix (see dermaops.prediction for what counts as an image). Every image goes through training's
preprocessing at the model's size. Writes to --out:

    predictions.csv     one row per image: image (its path in --images), image_id, decision (`decided`,
                        `refer` or `out_of_distribution`, below), predicted class (decided images only),
                        p_<class> for the 7 classes (calibrated when the checkpoint's meta carries a
                        `temperature`), mel_flag (at the stored `mel_threshold` operating point, else
                        argmax == mel), confidence, ood_score, gradcam (URI of its Grad-CAM PNG, with --gradcam)
    gradcam/<n>.png     with --gradcam predicted|mel: the image at model size beside its Grad-CAM
    predictions.json    what was predicted with: model URI and sha256, calibration, melanoma rule,
                        preprocessing, counts per predicted class, files ignored
    manifest.json       written last

The prediction guards the checkpoint carries (dermaops.guards, fitted by train on validation):
- an image whose penultimate-layer features lie past the out-of-distribution threshold (a Mahalanobis
  distance to the training classes, dermaops.ood) is `out_of_distribution`: no diagnosis, no
  probabilities, no melanoma flag;
- an image whose confidence (largest calibrated probability) is below the referral threshold is `refer`:
  no diagnosis (`predicted` blank), its probabilities and melanoma flag kept for the clinician;
- every other image is `decided`. A checkpoint without guards decides every image.

Prediction monitoring (dermaops.monitoring): with --registry, the batch's predicted class mix, referral rate
and out-of-distribution rate go into `<registry>/monitoring/`, and a batch past --max-class-mix-shift or
--max-ood-rate posts a Slack alert (before the manifest: a Slack outage fails the stage as transient, so the
retry posts it).

Same model (by sha256), same images (by sha256), same options: the stage skips.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING

from dermaops.config import PredictConfig
from dermaops.stage import Context, StageIO, fingerprint, skipped, utcnow
from dermaops.store import S3Uri

if TYPE_CHECKING:
    from dermaops.checkpoint import CheckpointMeta

HELP = "batch prediction: class probabilities and the melanoma flag for a folder of JPEGs, with a stored model"
# Bump when what predict computes changes: part of the fingerprint, so a re-run recomputes.
PREDICT_VERSION = 2
CONFIG = PredictConfig
OUT_OF_DISTRIBUTION = "out_of_distribution"
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="'champion' (the registry's production model) or an s3:// URI of a checkpoint (.pt) or of a prefix "
        "holding cnn.pt (a run's models/cnn or a registry models/<run_id>-<sha12>)",
    )
    parser.add_argument(
        "--images", required=True, help="a local folder or zip of JPEGs, or an s3:// prefix holding JPEGs or zips"
    )
    parser.add_argument("--out", required=True, help="output prefix (e.g. s3://<b>/predictions/<name>)")
    parser.add_argument(
        "--registry",
        default=None,
        help="model registry prefix (s3://<b>/registry/ham10000); needed for --model champion",
    )


def run(stage_io: StageIO, cfg: PredictConfig, ctx: Context) -> dict:
    # cfg: --gradcam, --tta, --batch-size, --device, the monitoring bounds
    images = stage_io.inputs["images"]
    out_uri = S3Uri.parse(stage_io.out)
    registry = str(S3Uri.parse(stage_io.inputs["registry"])) if stage_io.inputs["registry"] else None

    from dermaops import guards
    from dermaops.dataset import CLASSES
    from dermaops.imagecache import CACHE_FORMAT
    from dermaops.models import pick_device
    from dermaops.prediction import collect_images, load_model, resolve_model

    # The inputs first: a bad one fails before a checkpoint is downloaded.
    inputs = collect_images(images, ctx.store, ctx.scratch)
    resolved = resolve_model(ctx.store, stage_io.inputs["model"], registry, ctx.scratch)
    device = pick_device(cfg.device)
    predictor = load_model(resolved, device)
    meta, point, temperature = predictor.meta, predictor.point, predictor.temperature
    referral, found = guards.referral_threshold(meta), guards.detector(meta)
    log.info(
        "predicting %d images from %s with %s (%s, %s); calibration: %s; melanoma rule: %s; referral: %s; "
        "out-of-distribution detector: %s",
        len(inputs.images),
        images,
        resolved.uri,
        meta.arch,
        meta.frame.describe(),
        f"temperature {temperature}" if temperature else "none",
        point.rule,
        "none" if referral is None else f"confidence < {referral:.4f}",
        "none" if found is None else f"Mahalanobis score > {found.threshold:.2f}",
    )

    out = ctx.output(
        out_uri,
        "predict",
        fingerprint(
            version=PREDICT_VERSION,
            model_sha256=resolved.sha256,
            images=inputs.files,
            mel_threshold=point.threshold,
            gradcam=cfg.gradcam,
            tta=cfg.tta,
            decode=CACHE_FORMAT,
        ),
    )
    if (manifest := out.finished()) and not stage_io.force:
        log.info("predictions at %s are finished for this model and these images; skipping", out_uri)
        return skipped(manifest)
    out.unpublish()

    import numpy as np
    import pandas as pd

    from dermaops.prediction import draw_gradcams, predict_batches
    from dermaops.selective import confidence, decisions

    mel = CLASSES.index("mel")
    argmax_counts = np.zeros(len(CLASSES), dtype=np.int64)
    rows = []
    started = time.monotonic()
    for n_batch, batch in enumerate(predict_batches(predictor, inputs, batch_size=cfg.batch_size, tta=cfg.tta)):
        flags = predictor.flags(batch.proba, mel)
        decided = decisions(batch.proba, referral)
        conf = confidence(batch.proba)
        scores = None
        if found is not None:
            scores = found.scores(guards.features(predictor.model, batch.pixels, meta, cfg.batch_size, device))
            decided[scores > found.threshold] = OUT_OF_DISTRIBUTION
        argmax_counts += np.bincount(batch.proba[decided != OUT_OF_DISTRIBUTION].argmax(axis=1), minlength=len(CLASSES))
        cams = []
        if cfg.gradcam != "none":
            paths = draw_gradcams(predictor, batch, cfg.gradcam, ctx.scratch / "gradcam" / str(n_batch))
            for offset, path in enumerate(paths):
                name = f"gradcam/{len(rows) + offset:06d}.png"
                cams.append(str(out.put_file(name, path, content_type="image/png")))
        for i, item in enumerate(batch.images):
            unlike = decided[i] == OUT_OF_DISTRIBUTION
            row = {"image": item.name, "image_id": item.image_id, "decision": decided[i]}
            # Only a decided image gets a diagnosis; one unlike the training data gets nothing the model says.
            row["predicted"] = CLASSES[int(batch.proba[i].argmax())] if decided[i] == "decided" else ""
            row |= {f"p_{cls}": "" if unlike else round(float(batch.proba[i, c]), 6) for c, cls in enumerate(CLASSES)}
            row["mel_flag"] = "" if unlike else bool(flags[i])
            row["confidence"] = round(float(conf[i]), 6)
            row["ood_score"] = "" if scores is None else round(float(scores[i]), 4)
            row["gradcam"] = cams[i] if cams else ""
            rows.append(row)
        log.info("predicted %d/%d images (%.1f s)", len(rows), len(inputs.images), time.monotonic() - started)

    table = pd.DataFrame(rows)
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    csv_uri = out.put_text("predictions.csv", buffer.getvalue(), "text/csv")
    counts = {cls: int((table["predicted"] == cls).sum()) for cls in CLASSES}
    decision_counts = {d: int((table["decision"] == d).sum()) for d in ("decided", "refer", OUT_OF_DISTRIBUTION)}
    summary = {
        "images": images,
        "n_images": len(rows),
        "n_ignored": len(inputs.ignored),
        "predicted_counts": counts,
        "decisions": decision_counts,
        "referral_threshold": referral,
        "ood_threshold": None if found is None else found.threshold,
        "n_mel_flagged": int((table["mel_flag"] == True).sum()),  # noqa: E712 - the column holds "" for OOD images
        "mel_rule": point.rule,
        "mel_threshold": point.threshold,
        "calibration": f"temperature {temperature:g} (checkpoint meta)" if temperature else "none",
        **resolved.describe,
        "arch": meta.arch,
        "image_size": meta.image_size,
        "geometry": meta.geometry,
        "tta": cfg.tta,
        "gradcam": cfg.gradcam,
        "predictions_uri": str(csv_uri),
    }
    out.put_json(
        "predictions.json",
        {
            **summary,
            "created_at": utcnow(),
            "classes": list(CLASSES),
            "temperature": temperature,
            "preprocessing": f"{CACHE_FORMAT} to {meta.frame.describe()}, the training image cache's "
            "recipe; "
            f"then the model's normalisation (mean {list(meta.mean)}, std {list(meta.std)})"
            + ("; logit adjustment from the checkpoint" if meta.logit_bias is not None else ""),
            "ignored": inputs.ignored,
            "champion": resolved.champion,
        },
    )
    summary["summary_uri"] = str(out.uri("predictions.json"))
    if registry:
        summary["monitoring"] = monitor(ctx, stage_io, cfg, summary, meta, argmax_counts, resolved)
    out.publish(summary)
    return summary


def monitor(
    ctx, stage_io: StageIO, cfg: PredictConfig, summary: dict, meta: CheckpointMeta, argmax_counts, resolved
) -> dict:
    """The batch's monitoring record in the registry (dermaops.monitoring), and its Slack alert when it is past a
    bound; returns what the summary says about it."""
    from dermaops import guards, monitoring
    from dermaops.dataset import CLASSES

    record = monitoring.batch_record(
        run=S3Uri.parse(stage_io.out).key.rstrip("/").rsplit("/", 1)[-1],
        images=stage_io.inputs["images"],
        predictions_uri=summary["predictions_uri"],
        model={k: v for k, v in resolved.describe.items()},
        classes=list(CLASSES),
        argmax_counts=argmax_counts,
        decisions=summary["decisions"],
        prior=guards.train_prior(meta),
        max_class_mix_shift=cfg.max_class_mix_shift,
        max_ood_rate=cfg.max_ood_rate,
    )
    posted = monitoring.post_alert(record)
    uri = monitoring.record_uri(S3Uri.parse(stage_io.inputs["registry"]), record)
    ctx.store.put_json(uri, {**record, "alert_posted": posted})
    return {
        "record_uri": str(uri),
        "class_mix_shift": record["class_mix_shift"],
        "referral_rate": record["referral_rate"],
        "ood_rate": record["ood_rate"],
        "alerts": record["alerts"],
        "alert_posted": posted is not None,
    }
