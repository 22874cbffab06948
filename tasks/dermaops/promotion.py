"""Champion/challenger promotion for the production model.

Registry layout (`--registry s3://<bucket>/registry/ham10000`):

    champion.json                          the production model: where it is, its test metrics, why it won
    models/<run_id>-<sha12>/cnn.pt         immutable copies of every promoted checkpoint
    history/<decided_at>-<run_id>.json     one object per decision, promoted or not (append-only)

Why copy the checkpoint into the registry instead of pointing at runs/<run_id>/models/cnn/cnn.pt:
run prefixes are working areas (re-run with --force, lifecycle-expired, deleted by hand), while the
champion must stay loadable for as long as it is in production. The copy's key carries the content
hash, so no later run can overwrite it. champion.json keeps the run's URI as `source_model_uri`.

The gate. A challenger is promoted only if
  1. its melanoma recall on the test split is >= the floor (missing melanomas is the costly error), and
  2. it beats the current champion on the primary metric by more than the margin, where the champion
     is RE-SCORED on this run's test split (the metrics stored at its own promotion came from another
     split, possibly another dataset version, and are not comparable).
No champion yet: the first model is promoted if it clears the floor. A champion whose record or
checkpoint is missing, corrupt (checksum mismatch) or unloadable cannot be re-scored; it is treated as
no champion, and the reason says so, rather than blocking every future promotion. Transient S3 errors
are NOT treated that way: they fail the stage so the orchestrator retries.

Writes are ordered so that a crash never leaves champion.json pointing at something missing: the
checkpoint copy first, then the history entry, champion.json LAST. A retry after a crash between the
two finds itself already champion (same checkpoint hash) and records that.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermaops.errors import StageError, TransientError
from dermaops.store import ArtifactStore, S3Uri, sha256_file

PRIMARY_METRICS = ("macro_f1", "weighted_f1", "balanced_accuracy", "accuracy", "macro_auc")
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc")
CHAMPION = "champion.json"

log = logging.getLogger(__name__)


def headline(metrics: dict) -> dict:
    """The figures a decision is made on and recorded with (no confusion matrices)."""
    out = {k: metrics.get(k) for k in HEADLINE}
    out["mel_recall"] = metrics["per_class"]["mel"]["recall"]
    out["recall"] = {cls: m["recall"] for cls, m in metrics["per_class"].items()}
    return out


@dataclass(frozen=True)
class Decision:
    promoted: bool
    decision: str  # promoted | refused | already_champion
    reason: str


def decide(
    challenger: dict,
    champion: dict | None,
    primary_metric: str,
    margin: float,
    mel_recall_floor: float,
    no_champion_because: str = "no champion yet",
) -> Decision:
    """The gate on two classification_metrics dicts (test split); pure, no I/O."""
    mel = challenger["per_class"]["mel"]["recall"]
    if mel < mel_recall_floor:
        return Decision(False, "refused", f"melanoma recall {mel:.4f} is below the floor {mel_recall_floor:.4f}")
    value = challenger.get(primary_metric)
    if value is None:
        return Decision(False, "refused", f"{primary_metric} is undefined for the challenger on this test split")
    if champion is None:
        return Decision(
            True,
            "promoted",
            f"{no_champion_because}, so the challenger only has to clear the melanoma floor: "
            f"recall {mel:.4f} >= {mel_recall_floor:.4f}",
        )
    incumbent = champion.get(primary_metric)
    if incumbent is None:
        return Decision(True, "promoted", f"the champion's {primary_metric} is undefined on this test split")
    gain = value - incumbent
    if gain > margin:
        return Decision(
            True,
            "promoted",
            f"{primary_metric} {value:.4f} beats the champion's {incumbent:.4f} (re-scored on this test split) "
            f"by {gain:+.4f} > margin {margin:.4f}; melanoma recall {mel:.4f} >= floor {mel_recall_floor:.4f}",
        )
    return Decision(
        False,
        "refused",
        f"{primary_metric} {value:.4f} does not beat the champion's {incumbent:.4f} (re-scored on this test split) "
        f"by more than the margin {margin:.4f} (difference {gain:+.4f})",
    )


def _key_safe(text: str) -> str:
    """Airflow run ids carry ':' and '+'; keep S3 keys to a portable alphabet."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


@dataclass
class Challenger:
    run_id: str
    checkpoint: Path  # local copy of the challenger's checkpoint
    source_uri: str  # where the run stored it
    metrics: dict  # classification_metrics on the test split
    meta: dict  # checkpoint meta (arch, image_size, ...)
    dataset_version: str
    split_uri: str


@dataclass
class Registry:
    store: ArtifactStore
    uri: S3Uri

    @property
    def champion_uri(self) -> S3Uri:
        return self.uri.join(CHAMPION)

    def champion_record(self) -> tuple[dict | None, str]:
        """(champion.json, "") ; (None, "") when there is no champion yet; (None, what is wrong with it)."""
        if not self.store.exists(self.champion_uri):
            return None, ""
        try:
            record = self.store.get_json(self.champion_uri)
        except TransientError:
            raise
        except StageError as exc:
            return None, f"the champion record {self.champion_uri} is unreadable ({exc})"
        required = ("model_uri", "model_sha256", "run_id")
        missing = [k for k in required if not isinstance(record, dict) or k not in record]
        if missing:
            return None, f"the champion record {self.champion_uri} lacks {missing}"
        return record, ""

    def fetch_champion_model(self, record: dict, dest: Path) -> tuple[Path | None, str]:
        """The champion's checkpoint downloaded and checksum-verified, or (None, what is wrong)."""
        try:
            self.store.download(record["model_uri"], dest)
        except TransientError:
            raise
        except StageError as exc:
            return None, f"the champion's checkpoint is missing ({exc})"
        if sha256_file(dest) != record["model_sha256"]:
            return None, f"the champion's checkpoint {record['model_uri']} is corrupt (sha256 differs from {CHAMPION})"
        return dest, ""

    def store_model(self, challenger: Challenger, sha256: str) -> S3Uri:
        uri = self.uri.join("models", f"{_key_safe(challenger.run_id)}-{sha256[:12]}", "cnn.pt")
        if not self.store.exists(uri):
            self.store.put_file(uri, challenger.checkpoint, content_type="application/octet-stream")
        return uri

    def append_history(self, entry: dict) -> S3Uri:
        stamp = dt.datetime.fromisoformat(entry["decided_at"]).strftime("%Y%m%dT%H%M%S.%fZ")
        uri = self.uri.join("history", f"{stamp}-{_key_safe(entry['run_id'])}.json")
        self.store.put_json(uri, entry)
        return uri

    def history(self) -> list[dict]:
        """Every decision, oldest first (keys sort by time)."""
        uris = sorted((uri for uri, _ in self.store.list(self.uri.join("history"))), key=lambda uri: uri.key)
        return [self.store.get_json(uri) for uri in uris]


ChampionScorer = Callable[[Path], dict]
"""Loads a champion checkpoint and returns its classification_metrics on this run's test split;
raises StageError when the checkpoint cannot be loaded or scored."""


def _rescore(registry: Registry, record: dict, score_champion: ChampionScorer, scratch: Path):
    """(the champion's metrics on this test split, "") or (None, why it cannot be re-scored)."""
    path, problem = registry.fetch_champion_model(record, scratch / "champion" / "cnn.pt")
    if path is None:
        return None, problem
    try:
        return score_champion(path), ""
    except TransientError:
        raise
    except StageError as exc:
        return None, f"the champion's checkpoint cannot be scored ({exc})"


def run_gate(
    registry: Registry,
    challenger: Challenger,
    score_champion: ChampionScorer,
    primary_metric: str,
    margin: float,
    mel_recall_floor: float,
    scratch: Path,
) -> dict:
    """Decide, record the decision in the history, and (if promoted) write champion.json last.
    Returns the decision record (also what the history holds)."""
    sha256 = sha256_file(challenger.checkpoint)
    record, problem = registry.champion_record()
    champion_info = {"run_id": record["run_id"], "model_uri": record["model_uri"]} if record else None
    if record is not None and record["model_sha256"] == sha256:
        reason = f"this checkpoint is already the champion (run {record['run_id']})"
        decision = Decision(True, "already_champion", reason)
    else:
        champion_metrics = None
        if record is not None:
            champion_metrics, problem = _rescore(registry, record, score_champion, scratch)
            if champion_metrics is not None:
                champion_info["rescored"] = headline(champion_metrics)
        if problem:
            log.warning("treating the registry as having no champion: %s", problem)
            champion_info = {**(champion_info or {}), "problem": problem}
        decision = decide(
            challenger.metrics,
            champion_metrics,
            primary_metric,
            margin,
            mel_recall_floor,
            no_champion_because=f"{problem}; treated as no champion" if problem else "no champion yet",
        )
    log.info("promotion decision: %s (%s)", decision.decision, decision.reason)

    decided_at = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    model_uri = None
    if decision.decision == "promoted":
        model_uri = str(registry.store_model(challenger, sha256))
    elif decision.decision == "already_champion":
        model_uri = record["model_uri"]
    entry = {
        "run_id": challenger.run_id,
        "decided_at": decided_at,
        "decision": decision.decision,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "primary_metric": primary_metric,
        "promotion_margin": margin,
        "mel_recall_floor": mel_recall_floor,
        "dataset_version": challenger.dataset_version,
        "split_uri": challenger.split_uri,
        "challenger": {
            "source_model_uri": challenger.source_uri,
            "model_sha256": sha256,
            "arch": challenger.meta.get("arch"),
            "image_size": challenger.meta.get("image_size"),
            "metrics": headline(challenger.metrics),
        },
        "champion_before": champion_info,
        "champion_uri": model_uri or (record or {}).get("model_uri"),
    }
    history_uri = registry.append_history(entry)
    if decision.decision == "promoted":
        from dermaops.model_card import write_model_card

        # Beside the immutable copy, before champion.json: a champion always has its card.
        write_model_card(registry, challenger, entry, S3Uri.parse(model_uri), sha256)
        registry.store.put_json(
            registry.champion_uri,
            {
                "model_uri": model_uri,
                "model_sha256": sha256,
                "source_model_uri": challenger.source_uri,
                "arch": challenger.meta.get("arch"),
                "image_size": challenger.meta.get("image_size"),
                "run_id": challenger.run_id,
                "dataset_version": challenger.dataset_version,
                "split_uri": challenger.split_uri,
                "primary_metric": primary_metric,
                "metrics": headline(challenger.metrics),
                "decided_at": decided_at,
                "decision": decision.decision,
                "reason": decision.reason,
                "history_uri": str(history_uri),
                "previous_champion": champion_info,
            },
        )
    return {**entry, "history_uri": str(history_uri), "registry_uri": str(registry.uri)}
