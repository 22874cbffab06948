"""Champion/challenger promotion for the production model.

Registry layout (`--registry s3://<bucket>/registry/ham10000`):

    champion.json                          the production model: where it is, its test metrics, why it won
    models/<run_id>-<sha12>/cnn.pt         immutable copies of every promoted checkpoint
    history/<decided_at>-<run_id>.json     one object per decision, promoted or not (append-only)
    pending/<run_id>.json                  a challenger that passed the gate and awaits a reviewer (approval)
    approvals/<run_id>.json                that record with the reviewer's answer, moved here once it is decided
    lease.json                             who may change champion.json now (held for seconds, see below)

Why copy the checkpoint into the registry instead of pointing at runs/<run_id>/models/cnn/cnn.pt:
run prefixes are working areas (re-run with --force, lifecycle-expired, deleted by hand), while the
champion must stay loadable for as long as it is in production. The copy's key carries the content
hash, so no later run can overwrite it. champion.json keeps the run's URI as `source_model_uri`.

The gate. A challenger is promoted only if, in this order (the first failed rule is the reason):
  1. it was trained on the whole training split (a `--max-train-images` subset is a quick run, never
     production), unless the operator explicitly allows it;
  2. its melanoma recall on the test split is >= the floor (missing melanomas is the costly error);
  3. it clears the absolute floors on macro F1 and macro AUC (a model that calls nearly everything
     melanoma clears the recall floor and nothing else);
  4. it beats the run's own Random Forest baseline on the primary metric (a CNN that does not is not
     worth serving), so a run without a baseline promotes nothing;
  5. it beats the current champion on the primary metric by more than the margin, where the champion
     is RE-SCORED on this run's test split (the metrics stored at its own promotion came from another
     split, possibly another dataset version, and are not comparable). With both models' test
     probabilities (evaluate always has them), "beats" is a paired lesion-level bootstrap of the
     difference on these same images (dermaops.bootstrap.paired_difference): promoted only when the
     LOWER bound of its 95 % interval is above the margin, so a difference the test split cannot tell
     from noise keeps the champion. The interval is in the decision record and its reason;
  6. optionally (evaluate's --subgroup-gate, off by default), its melanoma sensitivity in no subgroup of
     sex, age band, localization or dx_type with enough test melanomas is below the champion's beyond the
     paired bootstrap (dermaops.subgroups); the refusal names the group, the record keeps every comparison.
Rules 1-4 hold for the first champion too.

Fail closed: a registry whose champion record exists but cannot be read, or whose checkpoint is
missing, corrupt (checksum mismatch) or unloadable, or whose champion.json is gone while its history
records promotions, is an INCIDENT, not an empty registry (deleting one object must not open the gate
to any model). The gate records the incident in the history and raises a one-line StageError, so
evaluate fails and the run's failure alert goes out. An operator who means it passes
`allow_broken_champion=True` (evaluate's --allow-broken-champion-override): then the broken champion
is treated as absent, with a warning in the log and the override in the decision record. Transient S3
errors fail the stage so the orchestrator retries.

Writes are ordered so that a crash never leaves champion.json pointing at something missing: the
checkpoint copy first, then the history entry, the model card, champion.json LAST. A retry after a
crash between the two finds itself already champion (same checkpoint hash) and records that. One
function makes a champion (`write_promotion`), whether the gate promotes at once or a reviewer approves.

Concurrent promotions (two evaluates at once, two approvals applied at once) are serialized by the
registry's lease (`lease.json`, dermaops.lease: created with If-None-Match, an expiry so that a crashed
holder blocks the others for LEASE_SECONDS at most). Under it, a promotion checks that champion.json is
still the one it was judged against (its ETag) and writes it, conditionally on that ETag. A gate that
lost the race judges its model again against the new champion (`rejudged` in its decision record); an
approval that lost it is recorded as superseded. Either way the history records both runs.

Human approval (evaluate's --require-approval, the DAG's `require_approval` param). A challenger that
passes the gate is not promoted yet: the gate records the decision `awaiting_approval` in the history
and writes `pending/<run_id>.json` (what would be promoted and why: the decision record, the test
metrics, the checkpoint's meta and hash). A reviewer then approves or rejects it (the DAG's HITL task)
and `resolve_approval` (the `promote` stage) either promotes it through `write_promotion`, or records
`rejected` in the history with the reviewer and their comment; champion.json is untouched until then.
An approval is applied only when the champion is still the one the challenger was compared with, and
the run's checkpoint still has the hash the gate saw; otherwise the history records `superseded`. Once
applied, the pending record moves to approvals/<run_id>.json with the answer.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermaops.checkpoint import CheckpointMeta
from dermaops.errors import StageError, TransientError
from dermaops.lease import Lease
from dermaops.metrics import headline as metrics_headline
from dermaops.metrics import mel_recall
from dermaops.pipeline import run_key
from dermaops.store import ArtifactStore, S3Uri, json_bytes, sha256_file

CHAMPION = "champion.json"
PENDING = "pending"
DECIDED = "approvals"
AWAITING = "awaiting_approval"
LEASE = "lease.json"
# How long a promotion may hold the registry's lease: its critical section is three small writes (the
# history entry, the model card, champion.json; the checkpoint is copied before), so this is ample, and
# it is also the longest a crashed holder keeps every other promotion waiting.
LEASE_SECONDS = 120.0
# A gate that finds the champion replaced while it judged (a concurrent promotion) judges again against
# the new one; after this many rounds it records itself as superseded.
GATE_ROUNDS = 3

log = logging.getLogger(__name__)


def headline(metrics: dict) -> dict:
    """The figures a decision is made on and recorded with (no confusion matrices)."""
    out = metrics_headline(metrics, digits=None)
    out["recall"] = {cls: m["recall"] for cls, m in metrics["per_class"].items()}
    return out


@dataclass(frozen=True)
class Decision:
    promoted: bool
    decision: str  # promoted | refused | already_champion
    reason: str


@dataclass(frozen=True)
class Floors:
    """What every challenger must clear, champion or not (evaluate's flags, the DAG's params)."""

    mel_recall: float = 0.5
    macro_f1: float = 0.25
    macro_auc: float = 0.75
    allow_subset: bool = False


@dataclass(frozen=True)
class GatePolicy:
    """How the gate judges a challenger: evaluate's settings (dermaops.config.EvaluateConfig, the DAG's
    params), in one value that decide() and run_gate() take."""

    primary_metric: str = "macro_f1"
    margin: float = 0.005  # what the challenger must beat the champion by, on the primary metric
    floors: Floors = Floors()
    require_approval: bool = False  # a challenger the gate would promote waits for a reviewer
    allow_broken_champion: bool = False  # an unloadable champion: judge as if there were none (else incident)

    @classmethod
    def from_config(cls, cfg) -> GatePolicy:
        """From an EvaluateConfig (not imported here: the config module knows nothing of the registry)."""
        return cls(
            primary_metric=cfg.primary_metric,
            margin=cfg.promotion_margin,
            floors=Floors(cfg.mel_recall_floor, cfg.min_macro_f1, cfg.min_macro_auc, cfg.allow_subset_promotion),
            require_approval=cfg.require_approval,
            allow_broken_champion=cfg.allow_broken_champion_override,
        )


def _absolute_gate(
    challenger: dict, primary_metric: str, floors: Floors, baseline: dict | None, subset: str | None
) -> Decision | None:
    """Rules 1-4 of the module docstring: a refusal, or None when the challenger clears them all."""
    if subset and not floors.allow_subset:
        return Decision(False, "refused", f"trained on a subset ({subset}); subset models are never promoted "
                        "unless explicitly allowed")  # fmt: skip
    mel = mel_recall(challenger)
    if mel < floors.mel_recall:
        return Decision(False, "refused", f"melanoma recall {mel:.4f} is below the floor {floors.mel_recall:.4f}")
    for metric, floor in (("macro_f1", floors.macro_f1), ("macro_auc", floors.macro_auc)):
        value = challenger.get(metric)
        if floor > 0 and (value is None or value < floor):
            shown = "undefined" if value is None else f"{value:.4f}"
            return Decision(False, "refused", f"{metric} {shown} is below the absolute floor {floor:.4f}")
    value = challenger.get(primary_metric)
    if value is None:
        return Decision(False, "refused", f"{primary_metric} is undefined for the challenger on this test split")
    if baseline is None:
        return Decision(False, "refused", "no Random Forest baseline of this run to beat (evaluate without --baseline)")
    floor = baseline.get(primary_metric)
    if floor is not None and not value > floor:
        return Decision(
            False,
            "refused",
            f"{primary_metric} {value:.4f} does not beat this run's Random Forest baseline ({floor:.4f})",
        )
    return None


def decide(
    challenger: dict,
    champion: dict | None,
    policy: GatePolicy,
    *,
    no_champion_because: str = "no champion yet",
    baseline: dict | None = None,
    subset: str | None = None,
    paired: dict | None = None,
) -> Decision:
    """The gate on classification_metrics dicts (test split); pure, no I/O. `baseline` is the run's Random
    Forest on the same split (None: not scored, which refuses), `subset` says how the challenger's training
    set was cut down (None: the whole training split); `paired` is the paired bootstrap of challenger minus
    champion on the primary metric (bootstrap.paired_difference), which decides rule 5 when given (its
    lower bound must clear the margin), else the point difference does."""
    primary_metric, margin, floors = policy.primary_metric, policy.margin, policy.floors
    refused = _absolute_gate(challenger, primary_metric, floors, baseline, subset)
    if refused is not None:
        return refused
    mel, value = mel_recall(challenger), challenger[primary_metric]
    if champion is None:
        against = baseline.get(primary_metric) if baseline else None
        return Decision(
            True,
            "promoted",
            f"{no_champion_because}; melanoma recall {mel:.4f} >= floor {floors.mel_recall:.4f}"
            + (f", {primary_metric} {value:.4f} beats this run's Random Forest baseline ({against:.4f})"
               if against is not None else "")
            + (f", macro F1 and AUC clear the floors {floors.macro_f1:.2f} / {floors.macro_auc:.2f}"
               if floors.macro_f1 or floors.macro_auc else ""),
        )  # fmt: skip
    incumbent = champion.get(primary_metric)
    if incumbent is None:
        return Decision(True, "promoted", f"the champion's {primary_metric} is undefined on this test split")
    gain = value - incumbent
    if paired is not None and paired.get("low") is not None:
        low, high = paired["low"], paired["high"]
        interval = (
            f"paired lesion bootstrap of the difference {gain:+.4f}: {paired['level']:.0%} interval "
            f"[{low:+.4f}, {high:+.4f}] over {paired['resamples']} resamples of {paired['lesions']} lesions"
        )
        if low > margin:
            return Decision(
                True,
                "promoted",
                f"{primary_metric} {value:.4f} beats the champion's {incumbent:.4f} (re-scored on this test split): "
                f"{interval}; its lower bound {low:+.4f} clears the margin {margin:.4f}; melanoma recall "
                f"{mel:.4f} >= floor {floors.mel_recall:.4f}",
            )
        return Decision(
            False,
            "refused",
            f"{primary_metric} {value:.4f} does not beat the champion's {incumbent:.4f} (re-scored on this test "
            f"split) by more than the margin {margin:.4f} with confidence: {interval}; its lower bound "
            f"{low:+.4f} does not clear the margin",
        )
    if gain > margin:
        return Decision(
            True,
            "promoted",
            f"{primary_metric} {value:.4f} beats the champion's {incumbent:.4f} (re-scored on this test split) "
            f"by {gain:+.4f} > margin {margin:.4f}; melanoma recall {mel:.4f} >= floor {floors.mel_recall:.4f}",
        )
    return Decision(
        False,
        "refused",
        f"{primary_metric} {value:.4f} does not beat the champion's {incumbent:.4f} (re-scored on this test split) "
        f"by more than the margin {margin:.4f} (difference {gain:+.4f})",
    )


@dataclass
class Challenger:
    run_id: str
    checkpoint: Path  # local copy of the challenger's checkpoint
    source_uri: str  # where the run stored it
    metrics: dict  # classification_metrics on the test split
    meta: CheckpointMeta  # the checkpoint's meta (registry records keep its JSON record())
    dataset_version: str
    split_uri: str
    proba: object = None  # (N, C) test probabilities, for the paired comparison with the champion
    recipe: dict | None = None  # the run's recipe params (dermaops.config.recipe_values); freshness compares it


@dataclass(frozen=True)
class ChampionState:
    record: dict | None  # champion.json, None when absent or broken
    problem: str  # "" when the record is fine or absent; else what is wrong with it
    etag: str | None  # of champion.json as read; None when there is none


@dataclass
class Registry:
    store: ArtifactStore
    uri: S3Uri
    lease_seconds: float = LEASE_SECONDS

    @property
    def champion_uri(self) -> S3Uri:
        return self.uri.join(CHAMPION)

    def champion_state(self) -> ChampionState:
        """champion.json as it is now: the record (or what is wrong with it) and the ETag a promotion's
        conditional write of champion.json must match (None: there is no champion.json)."""
        try:
            data, etag = self.store.get_with_etag(self.champion_uri)
        except TransientError:
            raise
        except StageError as exc:
            return ChampionState(None, f"the champion record {self.champion_uri} is unreadable ({exc})", None)
        if data is None:
            promoted = [h for h in self.history() if h.get("decision") == "promoted"]
            if promoted:
                return ChampionState(None, (
                    f"the champion record {self.champion_uri} is missing, but the history records "
                    f"{len(promoted)} promotions (last: run {promoted[-1].get('run_id')})"
                ), None)  # fmt: skip
            return ChampionState(None, "", None)
        try:
            record = json.loads(data)
        except ValueError as exc:
            return ChampionState(
                None, f"the champion record {self.champion_uri} is unreadable (not valid JSON: {exc})", etag
            )
        required = ("model_uri", "model_sha256", "run_id")
        missing = [k for k in required if not isinstance(record, dict) or k not in record]
        if missing:
            return ChampionState(None, f"the champion record {self.champion_uri} lacks {missing}", etag)
        return ChampionState(record, "", etag)

    def champion_record(self) -> tuple[dict | None, str]:
        """(champion.json, "") ; (None, "") when there is no champion yet; (None, what is wrong with it)."""
        state = self.champion_state()
        return state.record, state.problem

    def promotion_lease(self, purpose: str) -> Lease:
        """The registry's lease (LEASE): whoever changes champion.json holds it, so a promotion's check that the
        champion is still the one it was judged against and its write of champion.json are one step."""
        return Lease(
            self.store, self.uri.join(LEASE), {"purpose": purpose}, self.lease_seconds, self.lease_seconds * 1.5
        )

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
        uri = self.uri.join("models", f"{run_key(challenger.run_id)}-{sha256[:12]}", "cnn.pt")
        if not self.store.exists(uri):
            self.store.put_file(uri, challenger.checkpoint, content_type="application/octet-stream")
        return uri

    def pending_uri(self, run_id: str) -> S3Uri:
        """Where a challenger of this run that awaits a reviewer's approval is recorded."""
        return self.uri.join(PENDING, f"{run_key(run_id)}.json")

    def decided_uri(self, run_id: str) -> S3Uri:
        """Where its pending record goes, with the answer, once a reviewer's answer was applied: pending/ only
        ever lists what still awaits a reviewer."""
        return self.uri.join(DECIDED, f"{run_key(run_id)}.json")

    def append_history(self, entry: dict) -> S3Uri:
        stamp = dt.datetime.fromisoformat(entry["decided_at"]).strftime("%Y%m%dT%H%M%S.%fZ")
        uri = self.uri.join("history", f"{stamp}-{run_key(entry['run_id'])}.json")
        self.store.put_json(uri, entry)
        return uri

    def history(self) -> list[dict]:
        """Every decision, oldest first (keys sort by time)."""
        uris = sorted((uri for uri, _ in self.store.list(self.uri.join("history"))), key=lambda uri: uri.key)
        return [self.store.get_json(uri) for uri in uris]


ChampionScorer = Callable[[Path], tuple[dict, object]]
"""Loads a champion checkpoint and returns (its classification_metrics, its (N, C) probabilities) on this
run's test split, scored exactly like the challenger; raises StageError when it cannot be loaded or scored."""
PairedComparison = Callable[[object, object, str], dict]
"""(challenger probabilities, champion probabilities, metric) -> bootstrap.paired_difference's record."""
SubgroupCheck = Callable[[object, CheckpointMeta, object, CheckpointMeta | None, dict], dict]
"""The optional subgroup gate (evaluate's --subgroup-gate, dermaops.subgroups): (challenger probabilities, its
checkpoint meta, champion probabilities, its checkpoint meta (the `meta` of its metrics), champion.json) ->
{"groups": the paired comparison of each judged group, "refusal": the reason naming the group, or None}."""


def _rescore(registry: Registry, record: dict, score_champion: ChampionScorer, scratch: Path):
    """((the champion's metrics, its probabilities) on this test split, "") or (None, why it cannot be
    re-scored)."""
    path, problem = registry.fetch_champion_model(record, scratch / "champion" / "cnn.pt")
    if path is None:
        return None, problem
    try:
        return score_champion(path), ""
    except TransientError:
        raise
    except StageError as exc:
        return None, f"the champion's checkpoint cannot be scored ({exc})"


class ChampionIncident(StageError):
    """The registry has a champion that cannot be loaded: promotion is refused until someone looks."""


@dataclass(frozen=True)
class _Judgement:
    decision: Decision
    gate_reason: str  # the gate's own reason (before require_approval turned a promotion into a wait)
    entry: dict  # the decision record, as the history keeps it


def _judge(
    registry: Registry,
    challenger: Challenger,
    sha256: str,
    state: ChampionState,
    score_champion: ChampionScorer,
    policy: GatePolicy,
    scratch: Path,
    baseline: dict | None,
    subset: str | None,
    compare: PairedComparison | None,
    subgroup_check: SubgroupCheck | None = None,
) -> _Judgement:
    """The gate against the champion of `state`: re-score it, decide, build the decision record."""
    primary_metric, floors = policy.primary_metric, policy.floors
    record, problem = state.record, state.problem
    champion_info = {"run_id": record["run_id"], "model_uri": record["model_uri"]} if record else None
    paired = subgroup = None
    if record is not None and record["model_sha256"] == sha256:
        reason = f"this checkpoint is already the champion (run {record['run_id']})"
        decision = Decision(True, "already_champion", reason)
    else:
        champion_metrics = None
        if record is not None:
            rescored, problem = _rescore(registry, record, score_champion, scratch)
            if rescored is not None:
                champion_metrics, champion_proba = rescored
                champion_info["rescored"] = headline(champion_metrics)
                if compare is not None and challenger.proba is not None:
                    paired = compare(challenger.proba, champion_proba, primary_metric)
        if problem:
            champion_info = {**(champion_info or {}), "problem": problem}
            if not policy.allow_broken_champion:
                _record_incident(registry, challenger, sha256, problem, champion_info, primary_metric)
                raise ChampionIncident(
                    f"promotion refused: {problem}; an incident, not an empty registry: restore the champion, "
                    "or re-run with the allow_broken_champion_override param (--allow-broken-champion-override) "
                    "to judge this model as if there were no champion"
                )
            log.warning("OVERRIDE (allow_broken_champion): treating the registry as having no champion: %s", problem)
            champion_info["override"] = "allow_broken_champion"
        decision = decide(
            challenger.metrics,
            champion_metrics,
            policy,
            no_champion_because=f"{problem}; treated as no champion (override)" if problem else "no champion yet",
            baseline=baseline,
            subset=subset,
            paired=paired,
        )
        # The subgroup gate: a challenger that beats the champion overall must not lose melanomas in a group.
        if subgroup_check is not None and decision.promoted and champion_metrics is not None:
            subgroup = subgroup_check(
                challenger.proba, challenger.meta, champion_proba, champion_metrics.get("meta"), record
            )
            if subgroup["refusal"]:
                decision = Decision(False, "refused", subgroup["refusal"])
    gate_reason = decision.reason
    if decision.decision == "promoted" and policy.require_approval:
        decision = Decision(False, AWAITING, f"{decision.reason}; awaiting a reviewer's approval (require_approval)")
    entry = {
        "run_id": challenger.run_id,
        "decided_at": _now(),
        "decision": decision.decision,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "primary_metric": primary_metric,
        "promotion_margin": policy.margin,
        "mel_recall_floor": floors.mel_recall,
        "floors": {"macro_f1": floors.macro_f1, "macro_auc": floors.macro_auc, "allow_subset": floors.allow_subset},
        "baseline": {primary_metric: baseline.get(primary_metric)} if baseline else None,
        "subset": subset,
        "dataset_version": challenger.dataset_version,
        "split_uri": challenger.split_uri,
        "recipe": challenger.recipe,
        "challenger": {
            "source_model_uri": challenger.source_uri,
            "model_sha256": sha256,
            "arch": challenger.meta.arch,
            "image_size": challenger.meta.image_size,
            "metrics": headline(challenger.metrics),
        },
        "champion_before": champion_info,
        "paired_bootstrap": paired,
        **({"subgroup_gate": subgroup} if subgroup is not None else {}),
        "champion_uri": (record or {}).get("model_uri"),
    }
    return _Judgement(decision, gate_reason, entry)


def run_gate(
    registry: Registry,
    challenger: Challenger,
    score_champion: ChampionScorer,
    policy: GatePolicy,
    scratch: Path,
    *,
    baseline: dict | None = None,
    subset: str | None = None,
    compare: PairedComparison | None = None,
    subgroup_check: SubgroupCheck | None = None,
) -> dict:
    """Decide, record the decision in the history, and (if promoted) write champion.json last.
    Returns the decision record (also what the history holds). Raises ChampionIncident (after
    recording it) when the champion cannot be loaded and the policy does not allow a broken champion. With
    `compare` and the challenger's probabilities, rule 5 is the paired bootstrap (module docstring).
    With the policy's `require_approval`, a challenger the gate would promote is recorded as awaiting approval
    (history and pending/<run_id>.json) instead, and champion.json is left alone.

    Concurrent gates (two evaluates at once): the slow part, re-scoring the champion, runs unlocked; a
    promotion then takes the registry's lease and promotes only if champion.json is still the one it
    was judged against (same ETag). Otherwise another run was promoted meanwhile: the gate judges this
    model again against the new champion (GATE_ROUNDS rounds at most, then it is recorded as
    superseded), and its decision record lists the rounds it lost under `rejudged`."""
    sha256 = sha256_file(challenger.checkpoint)
    rejudged: list[dict] = []
    for _ in range(GATE_ROUNDS):
        state = registry.champion_state()
        judged = _judge(
            registry, challenger, sha256, state, score_champion, policy, scratch, baseline, subset, compare,
            subgroup_check,
        )  # fmt: skip
        decision, entry = judged.decision, judged.entry
        if rejudged:
            entry["rejudged"] = rejudged
            entry["reason"] = (
                f"judged again against run {(state.record or {}).get('run_id')}, promoted while this gate ran: "
                f"{entry['reason']}"
            )
        log.info("promotion decision: %s (%s)", decision.decision, entry["reason"])
        if decision.decision != "promoted":
            break
        registry.store_model(challenger, sha256)  # content-addressed, so harmless to copy before the lease
        with registry.promotion_lease(f"promotion of run {challenger.run_id} (evaluate)"):
            now = registry.champion_state()
            if now.etag == state.etag:
                entry, history_uri = write_promotion(registry, challenger, entry, sha256, state.etag)
                return {**entry, "history_uri": str(history_uri), "registry_uri": str(registry.uri)}
        rejudged.append(
            {
                "champion_run_id": (state.record or {}).get("run_id"),
                "decision": decision.decision,
                "reason": entry["reason"],
                "champion_run_id_now": (now.record or {}).get("run_id"),
            }
        )
        log.warning(
            "%s changed while this gate ran (champion run %s then, %s now): judging run %s again against it",
            registry.champion_uri, rejudged[-1]["champion_run_id"], rejudged[-1]["champion_run_id_now"],
            challenger.run_id,
        )  # fmt: skip
    else:
        entry.update(
            decision="superseded",
            promoted=False,
            reason=f"the champion changed in each of {GATE_ROUNDS} rounds of this gate (other runs were promoted "
            f"meanwhile); not promoted: re-run to judge this model against the champion then",
        )
    history_uri = registry.append_history(entry)
    result = {**entry, "history_uri": str(history_uri), "registry_uri": str(registry.uri)}
    if decision.decision == AWAITING:
        pending_uri = registry.pending_uri(challenger.run_id)
        result["pending_uri"] = str(pending_uri)
        registry.store.put_json(
            pending_uri,
            {
                "gate": result,
                "gate_reason": judged.gate_reason,
                "challenger": {
                    "run_id": challenger.run_id,
                    "source_model_uri": challenger.source_uri,
                    "model_sha256": sha256,
                    "metrics": challenger.metrics,
                    "meta": challenger.meta.record(),
                    "dataset_version": challenger.dataset_version,
                    "split_uri": challenger.split_uri,
                    "recipe": challenger.recipe,
                },
                "resolved": None,
            },
        )
    return result


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def write_promotion(
    registry: Registry, challenger: Challenger, entry: dict, sha256: str, champion_etag: str | None
) -> tuple[dict, S3Uri]:
    """Make `challenger` the champion: the one place that does it, for the gate and for an approval.

    Called holding the registry's lease (Registry.promotion_lease), after checking that champion.json still
    has `champion_etag` (None: there is none). `entry` is its decision record with decision "promoted"; its
    `champion_before` becomes champion.json's `previous_champion`. In order: the checkpoint's immutable
    copy, the history entry, the model card beside the copy, champion.json LAST, as a conditional write
    on `champion_etag`: should a lease have expired under a stalled holder and another promotion have
    landed meanwhile, this one is recorded as superseded and fails as transient instead of replacing it.
    Returns (the entry as recorded, its history URI)."""
    from dermaops.model_card import write_model_card

    model_uri = registry.store_model(challenger, sha256)
    entry = {**entry, "champion_uri": str(model_uri)}
    history_uri = registry.append_history(entry)
    # Beside the immutable copy, before champion.json: a champion always has its card.
    write_model_card(registry, challenger, entry, model_uri, sha256)
    record = json_bytes(
        {
            "model_uri": str(model_uri),
            "model_sha256": sha256,
            "source_model_uri": challenger.source_uri,
            "arch": challenger.meta.arch,
            "image_size": challenger.meta.image_size,
            "run_id": challenger.run_id,
            "dataset_version": challenger.dataset_version,
            "split_uri": challenger.split_uri,
            "recipe": challenger.recipe,
            "primary_metric": entry["primary_metric"],
            "metrics": headline(challenger.metrics),
            # Where predict reads the threshold (dermaops.prediction.operating_point), and what it was chosen for.
            "mel_threshold": challenger.meta.mel_threshold,
            "operating_point": operating_point_record(challenger.meta, challenger.metrics),
            "decided_at": entry["decided_at"],
            "decision": entry["decision"],
            "reason": entry["reason"],
            "history_uri": str(history_uri),
            "previous_champion": entry.get("champion_before"),
            **({"approval": entry["approval"]} if entry.get("approval") else {}),
        }
    )
    condition = {"if_match": champion_etag} if champion_etag else {"if_none_match": True}
    if registry.store.put_if(registry.champion_uri, record, **condition) is None:
        registry.append_history(
            {
                **entry,
                "decided_at": _now(),
                "decision": "superseded",
                "promoted": False,
                "reason": f"{registry.champion_uri} changed while this promotion was written (the registry lease had "
                f"expired): the promotion recorded at {history_uri} did not take effect",
            }
        )
        raise TransientError(
            f"{registry.champion_uri} changed while run {challenger.run_id}'s promotion was being written; "
            "not replacing it (a retry judges this model against the new champion)"
        )
    return entry, history_uri


def operating_point_record(meta: CheckpointMeta, metrics: dict) -> dict | None:
    """The melanoma operating point of a model: its threshold on the calibrated p(mel), the sensitivity it was
    chosen for, and its sensitivity and specificity on validation (train's fit, the checkpoint meta) and on the
    test split (evaluate, with lesion-bootstrap intervals). None when the checkpoint carries no threshold."""
    if meta.mel_threshold is None:
        return None
    fitted = meta.calibration or {}
    test = metrics.get("mel_operating_point") or {}
    return {
        "threshold": meta.mel_threshold,
        "target_sensitivity": fitted.get("mel_target_sensitivity"),
        "validation": {
            "sensitivity": fitted.get("val_mel_sensitivity"),
            "specificity": fitted.get("val_mel_specificity"),
        },
        "test": {
            k: test.get(k)
            for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "n_mel", "n_other")
        }
        if test
        else None,
    }


def resolve_approval(
    registry: Registry,
    run_id: str,
    approved: bool,
    reviewer: str,
    comment: str,
    responded_at: str | None,
    scratch: Path,
    timed_out: bool = False,
) -> dict:
    """Apply a reviewer's answer to the challenger of `run_id` that awaits approval (pending/<run_id>.json).
    `timed_out` (with approved False): nobody answered within the approval's response timeout; a rejection
    with no reviewer.

    Approved: promoted through write_promotion, provided the champion is still the one the gate compared
    it with and the run's checkpoint still has the gate's hash (else the history records `superseded`).
    Rejected: the history records `rejected` with the reviewer and the comment; champion.json is untouched.
    The pending record is moved to approvals/<run_id>.json with the result last (written there, then removed
    from pending/), so a retry after a crash applies the answer again, or finds it applied and returns its
    result with status "skipped". StageError when nothing awaits approval."""
    pending_uri, decided_uri = registry.pending_uri(run_id), registry.decided_uri(run_id)
    decided = registry.store.get_json_or_none(decided_uri)
    if decided and decided.get("resolved"):
        if registry.store.exists(pending_uri):  # a crash between the archive and the removal
            registry.store.delete(pending_uri)
        log.info("the approval of run %s was already applied: %s", run_id, decided["resolved"]["decision"])
        return {**decided["resolved"], "status": "skipped"}
    if not registry.store.exists(pending_uri):
        raise StageError(
            f"no challenger of run {run_id} awaits approval: {pending_uri} does not exist (evaluate writes it "
            "with --require-approval when the challenger passes the gate)"
        )
    pending = registry.store.get_json(pending_uri)
    gate, facts = pending["gate"], pending["challenger"]
    approval = {
        "decision": "approved" if approved else "rejected",
        "reviewer": None if timed_out else reviewer,
        "comment": comment,
        "responded_at": responded_at,
        **({"timed_out": True} if timed_out else {}),
    }
    if timed_out:
        said = "rejected: nobody answered within the approval's response timeout (its default is Reject)"
    else:
        said = f"{approval['decision']} by {reviewer}" + (f": {comment}" if comment else " (no comment)")
    entry = {
        **{k: v for k, v in gate.items() if k not in ("history_uri", "registry_uri", "pending_uri")},
        "decided_at": _now(),
        "approval": approval,
        "gate": {
            "decided_at": gate["decided_at"],
            "reason": pending.get("gate_reason"),
            "history_uri": gate.get("history_uri"),
        },
    }
    if not approved:
        entry.update(decision="rejected", promoted=False, reason=said)
        history_uri = registry.append_history(entry)
    else:
        before = gate.get("champion_before") or {}
        then = None if before.get("override") else before.get("model_uri")
        checkpoint = scratch / "approved" / "cnn.pt"
        registry.store.download(facts["source_model_uri"], checkpoint)
        if sha256_file(checkpoint) != facts["model_sha256"]:
            raise StageError(
                f"the approved checkpoint {facts['source_model_uri']} changed since the gate (sha256 differs from "
                f"{pending_uri}); re-run evaluate"
            )
        challenger = Challenger(
            run_id=facts["run_id"],
            checkpoint=checkpoint,
            source_uri=facts["source_model_uri"],
            metrics=facts["metrics"],
            meta=CheckpointMeta.from_dict(facts["meta"], f"the challenger's meta in {pending_uri}"),
            dataset_version=facts["dataset_version"],
            split_uri=facts["split_uri"],
            recipe=facts.get("recipe"),
        )
        registry.store_model(challenger, facts["model_sha256"])  # content-addressed: copied before the lease
        # The stale-approval check and the write are one step under the lease: of two approvals applied at
        # once, the second sees the first one's champion and is recorded as superseded.
        with registry.promotion_lease(f"approval of run {run_id} (promote)"):
            state = registry.champion_state()
            if state.problem and not before.get("override"):
                raise ChampionIncident(f"the approval of run {run_id} by {reviewer} was not applied: {state.problem}")
            now = None if state.problem else (state.record or {}).get("model_uri")
            if now != then:
                entry.update(
                    decision="superseded",
                    promoted=False,
                    reason=f"{said}, but the champion changed since the gate ({then or 'none'} then, {now or 'none'} "
                    "now): the comparison no longer holds; re-run to judge this model against the new champion",
                    champion_uri=now,
                )
                history_uri = registry.append_history(entry)
            else:
                entry.update(
                    decision="promoted", promoted=True, reason=f"{said}; the gate: {pending.get('gate_reason')}"
                )
                entry, history_uri = write_promotion(registry, challenger, entry, facts["model_sha256"], state.etag)
    log.info("approval of run %s: %s (%s)", run_id, entry["decision"], entry["reason"])
    result = {
        **entry,
        "history_uri": str(history_uri),
        "registry_uri": str(registry.uri),
        "approval_uri": str(decided_uri),
    }
    registry.store.put_json(decided_uri, {**pending, "resolved": result})
    registry.store.delete(pending_uri)
    return result


def _record_incident(
    registry: Registry, challenger: Challenger, sha256: str, problem: str, champion_info: dict, primary_metric: str
) -> None:
    """The refused promotion goes into the history like any decision, so the incident has a record."""
    registry.append_history(
        {
            "run_id": challenger.run_id,
            "decided_at": _now(),
            "decision": "incident",
            "promoted": False,
            "reason": f"promotion refused: {problem}",
            "primary_metric": primary_metric,
            "dataset_version": challenger.dataset_version,
            "split_uri": challenger.split_uri,
            "challenger": {
                "source_model_uri": challenger.source_uri,
                "model_sha256": sha256,
                "metrics": headline(challenger.metrics),
            },
            "champion_before": champion_info,
        }
    )
