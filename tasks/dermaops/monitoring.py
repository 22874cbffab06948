"""Prediction monitoring: what each `predict` batch saw, recorded in the registry, and an alert when a batch
looks unlike what the model was trained for.

Each batch predicted with --registry writes one record, `<registry>/monitoring/<created_at>-<run>.json`:
the predicted class mix (the argmax over the batch's in-distribution images, decided or referred: the
model's view of what came in), the referral rate, the out-of-distribution rate, the training prior the
checkpoint carries (dermaops.guards), the bounds and the alerts. The registry view charts them over time.

Two bounds (predict's --max-class-mix-shift and --max-ood-rate):
- the class mix against the training prior, as the total variation distance (half the L1 distance: the
  share of predictions that would have to change class for the mix to equal the prior);
- the out-of-distribution rate (about 5 % of genuine dermatoscopy is flagged by design, dermaops.ood).
A batch past either posts a Slack alert (dermaops.slack, the notify stage's configuration).
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np

from dermaops.store import ArtifactStore, S3Uri

MONITORING = "monitoring"
log = logging.getLogger(__name__)


def total_variation(p, q) -> float:
    return float(0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


def batch_record(
    *,
    run: str,
    images: str,
    predictions_uri: str,
    model: dict,
    classes: list[str],
    argmax_counts: np.ndarray,
    decisions: dict[str, int],
    prior: np.ndarray | None,
    max_class_mix_shift: float,
    max_ood_rate: float,
) -> dict:
    """One batch's monitoring record, its alerts included."""
    n_images = int(sum(decisions.values()))
    in_distribution = int(np.sum(argmax_counts))
    mix = argmax_counts / in_distribution if in_distribution else np.zeros(len(classes))
    ood_rate = decisions.get("out_of_distribution", 0) / n_images if n_images else 0.0
    referral_rate = decisions.get("refer", 0) / n_images if n_images else 0.0
    shift = total_variation(mix, prior) if prior is not None and in_distribution else None
    alerts = []
    if shift is not None and shift > max_class_mix_shift:
        top = sorted(range(len(classes)), key=lambda c: -abs(mix[c] - prior[c]))[:3]
        moved = ", ".join(f"{classes[c]} {mix[c]:.1%} (prior {prior[c]:.1%})" for c in top)
        alerts.append(
            f"predicted class mix differs from the training prior by {shift:.3f} (total variation), over the bound "
            f"{max_class_mix_shift}: {moved}"
        )
    if ood_rate > max_ood_rate:
        alerts.append(
            f"{ood_rate:.1%} of the images are out of distribution "
            f"({decisions.get('out_of_distribution', 0)} of {n_images}), over the bound {max_ood_rate:.1%}"
        )
    return {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": run,
        "images": images,
        "predictions_uri": predictions_uri,
        "model": model,
        "n_images": n_images,
        "decisions": decisions,
        "classes": list(classes),
        "class_mix": {cls: round(float(share), 6) for cls, share in zip(classes, mix, strict=True)},
        "train_prior": None if prior is None else {c: float(p) for c, p in zip(classes, prior, strict=True)},
        "class_mix_shift": None if shift is None else round(shift, 6),
        "referral_rate": round(referral_rate, 6),
        "ood_rate": round(ood_rate, 6),
        "bounds": {"class_mix_shift": max_class_mix_shift, "ood_rate": max_ood_rate},
        "alerts": alerts,
    }


def record_uri(registry: S3Uri, record: dict) -> S3Uri:
    from dermaops.pipeline import run_key

    stamp = dt.datetime.fromisoformat(record["created_at"]).strftime("%Y%m%dT%H%M%SZ")
    return registry.join(MONITORING, f"{stamp}-{run_key(record['run'])}.json")


def read_all(store: ArtifactStore, registry: S3Uri) -> list[dict]:
    """Every batch record, oldest first (keys sort by time)."""
    uris = sorted((uri for uri, _ in store.list(registry.join(MONITORING))), key=lambda uri: uri.key)
    return [store.get_json(uri) for uri in uris]


def alert_message(record: dict) -> tuple[str, list[dict]]:
    """The Slack message of a batch past a bound."""
    text = f"⚠️ DermaOps prediction monitoring: batch {record['run']} is past a bound"
    lines = "\n".join(f"• {alert}" for alert in record["alerts"])
    facts = (
        f"*Images* `{record['images']}` ({record['n_images']})\n*Referred* {record['referral_rate']:.1%}   "
        f"*Out of distribution* {record['ood_rate']:.1%}\n*Predictions* `{record['predictions_uri']}`"
    )
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "⚠️ DermaOps prediction monitoring"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Batch* `{record['run']}`\n{lines}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": facts}},
    ]
    return text, blocks


def post_alert(record: dict) -> dict | None:
    """Post the batch's alert to Slack when it has one: {"channel", "ts"}, or None (no alert, or Slack not
    configured: logged). Slack errors raise as dermaops.slack raises them."""
    from dermaops import slack

    if not record["alerts"]:
        return None
    target = slack.SlackTarget.from_env()
    if target is None:
        log.warning("prediction monitoring alert NOT posted (Slack is not configured): %s", "; ".join(record["alerts"]))
        return None
    posted = slack.post_message(target, *alert_message(record))
    log.info("prediction monitoring alert posted to Slack: %s", "; ".join(record["alerts"]))
    return posted
