"""The registry view's trends and comparison pages (served by plugins/dermaops_registry), read from S3:

- trends: every champion and challenger version the registry has judged (one per run, its latest decision),
  charted in decision order: macro F1, balanced accuracy, melanoma sensitivity (at the operating point,
  else the argmax recall), ECE and the data drift score (the largest PSI of validate's drift report against
  the champion's data), each point marked by the decision; then prediction monitoring: each `predict`
  batch's class mix against the training prior, its referral and out-of-distribution rates against the
  bounds, alerts marked (dermaops.monitoring);
- compare: any two versions side by side: per-class recall, confusion matrices, the subgroup table, and the
  differences of their recipes and dataset versions.

The figures of a version come from its run's evaluation `metrics.json` (and `validation/drift.json`), the
one place evaluate writes them; a run folder that is gone leaves the history's headline figures only.
Charts are matplotlib SVG rendered on the server and inlined (text drawn as paths): no script, no external
asset, nothing from the registry interpreted as markup; the plugin works offline inside the Airflow UI's
iframe like the rest of the view.
"""

from __future__ import annotations

import html
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dermaops.errors import StageError, TransientError
from dermaops.store import ArtifactStore, S3Uri

TREND_METRICS = (
    ("macro_f1", "macro F1"),
    ("balanced_accuracy", "balanced accuracy"),
    ("mel_sensitivity", "melanoma sensitivity"),
    ("ece", "ECE (test, calibrated)"),
    ("drift", "data drift (max PSI)"),
)
DECISION_STYLE = {  # marker, colour
    "promoted": ("*", "#2f855a"),
    "already_champion": ("*", "#2f855a"),
    "refused": ("x", "#c53030"),
    "awaiting_approval": ("s", "#b7791f"),
    "rejected": ("x", "#9b2c2c"),
    "superseded": ("v", "#718096"),
    "incident": ("X", "#000000"),
}
DRIFT_PSI = 0.2  # dermaops.drift's threshold, drawn on the drift panel


@dataclass
class Version:
    run_id: str
    decided_at: str
    decision: str
    entry: dict  # the latest history entry of this run
    metrics: dict | None = None  # the run's evaluation metrics.json (None: its run folder is gone)
    drift: dict | None = None  # the run's validation drift.json
    figures: dict = field(default_factory=dict)  # TREND_METRICS -> value


def _optional(store: ArtifactStore, uri: S3Uri) -> dict | None:
    try:
        return store.get_json(uri) if store.exists(uri) else None
    except TransientError:
        raise
    except StageError:
        return None


def _run_prefix(entry: dict) -> S3Uri | None:
    source = (entry.get("challenger") or {}).get("source_model_uri") or ""
    return S3Uri.parse(source.rsplit("/models/", 1)[0]) if "/models/" in source else None


def figures_of(entry: dict, metrics: dict | None, drift: dict | None) -> dict:
    headline = (entry.get("challenger") or {}).get("metrics") or {}
    test = (metrics or {}).get("test") or {}
    point = (metrics or {}).get("mel_operating_point") or {}
    return {
        "macro_f1": test.get("macro_f1", headline.get("macro_f1")),
        "balanced_accuracy": test.get("balanced_accuracy", headline.get("balanced_accuracy")),
        "mel_sensitivity": point.get("sensitivity", headline.get("mel_recall")),
        "ece": test.get("ece"),
        "drift": (drift or {}).get("max_psi"),
    }


def versions(store: ArtifactStore, history: list[dict]) -> list[Version]:
    """One Version per judged run (its latest decision), oldest first, with its run's figures."""
    latest: dict[str, dict] = {}
    for entry in sorted(history, key=lambda h: h.get("decided_at") or ""):
        if entry.get("challenger"):
            latest[entry["run_id"]] = entry
    out = [Version(run_id, e["decided_at"], e["decision"], e) for run_id, e in latest.items()]

    def load(version: Version) -> None:
        prefix = _run_prefix(version.entry)
        if prefix is not None:
            version.metrics = _optional(store, prefix.join("evaluation", "metrics.json"))
            version.drift = _optional(store, prefix.join("validation", "drift.json"))
        version.figures = figures_of(version.entry, version.metrics, version.drift)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(load, out))
    return out


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # inline: without the XML declaration and doctype


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # text as paths: nothing stored is ever markup in the page
    return plt


def trend_chart(found: list[Version]) -> str:
    """SVG: one panel per trend metric over the versions, each point marked by its decision."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(TREND_METRICS), 1, figsize=(9, 2.0 * len(TREND_METRICS)), sharex=True)
    xs = range(len(found))
    for ax, (key, label) in zip(axes, TREND_METRICS, strict=True):
        values = [v.figures.get(key) for v in found]
        known = [(x, y) for x, y in zip(xs, values, strict=True) if y is not None]
        if known:
            ax.plot(*zip(*known, strict=True), color="#a0aec0", linewidth=1, zorder=1)
        for x, v in zip(xs, found, strict=True):
            if v.figures.get(key) is not None:
                marker, color = DECISION_STYLE.get(v.decision, ("o", "#4a5568"))
                ax.scatter([x], [v.figures[key]], marker=marker, color=color, s=70, zorder=2)
        if key == "drift":
            ax.axhline(DRIFT_PSI, color="#c53030", linestyle=":", linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(list(xs), [f"{v.run_id}\n{v.decided_at[:10]}" for v in found], fontsize=7, rotation=30,
                        ha="right")  # fmt: skip
    handles = [
        plt.Line2D([], [], marker=m, color=c, linestyle="", label=d)
        for d, (m, c) in DECISION_STYLE.items()
        if any(v.decision == d for v in found)
    ]
    axes[0].legend(handles=handles, fontsize=7, loc="upper left", ncols=len(handles) or 1)
    axes[0].set_title("Every judged version, in decision order", fontsize=10)
    fig.tight_layout()
    return _svg(fig)


def monitoring_chart(records: list[dict]) -> str:
    """SVG: each batch's predicted class shares (solid) against the training prior (dashed), and its referral
    and out-of-distribution rates against the bounds; batches that alerted are marked."""
    plt = _pyplot()
    fig, (mix, rates) = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True)
    xs = list(range(len(records)))
    classes = records[-1]["classes"]
    colors = plt.get_cmap("tab10")
    for c, cls in enumerate(classes):
        mix.plot(xs, [r["class_mix"].get(cls, 0.0) for r in records], marker="o", color=colors(c), label=cls)
        prior = [(r.get("train_prior") or {}).get(cls) for r in records]
        if any(p is not None for p in prior):
            mix.plot(xs, prior, linestyle="--", linewidth=1, color=colors(c))
    mix.set_ylabel("share of the batch (argmax)", fontsize=8)
    mix.set_title("Predicted class mix per batch (solid) against the training prior (dashed)", fontsize=10)
    mix.legend(fontsize=7, ncols=7, loc="upper left")
    rates.plot(xs, [r["referral_rate"] for r in records], marker="o", label="referral rate")
    rates.plot(xs, [r["ood_rate"] for r in records], marker="o", label="out-of-distribution rate")
    rates.plot(xs, [r.get("class_mix_shift") for r in records], marker="o", label="class-mix shift (TV)")
    bounds = records[-1]["bounds"]
    rates.axhline(bounds["ood_rate"], color="#c53030", linestyle=":", label="out-of-distribution bound")
    rates.axhline(bounds["class_mix_shift"], color="#805ad5", linestyle=":", label="class-mix bound")
    for x, r in zip(xs, records, strict=True):
        if r["alerts"]:
            for ax in (mix, rates):
                ax.axvspan(x - 0.3, x + 0.3, color="#fed7d7", zorder=0)
    rates.set_ylim(0, 1)
    rates.set_ylabel("rate", fontsize=8)
    rates.legend(fontsize=7, loc="upper left", ncols=3)
    rates.set_xticks(xs, [f"{r['run']}\n{r['created_at'][:16]}" for r in records], fontsize=7, rotation=30, ha="right")
    for ax in (mix, rates):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


# -- the pages ---------------------------------------------------------------------------------
def _e(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("n/a" if value is None else str(value))


def render_trends(found: list[Version], records: list[dict], style: str) -> str:
    rows = "".join(
        f'<tr class="{_e(v.decision)}"><td>{_e(v.run_id)}</td><td>{_e(v.decided_at)}</td><td>{_e(v.decision)}</td>'
        + "".join(f"<td>{_e(v.figures.get(k))}</td>" for k, _ in TREND_METRICS)
        + "</tr>"
        for v in found
    )
    head = "<tr><th>run</th><th>decided at</th><th>decision</th>" + "".join(
        f"<th>{html.escape(label)}</th>" for _, label in TREND_METRICS
    )
    models = (
        f'<div class="chart" id="trend-chart">{trend_chart(found)}</div><table>{head}</tr>{rows}</table>'
        if found
        else '<p class="empty">No version judged yet.</p>'
    )
    batches = "".join(
        f"<tr><td>{_e(r['created_at'])}</td><td>{_e(r['run'])}</td><td>{_e(r['n_images'])}</td>"
        f"<td>{_e(r.get('class_mix_shift'))}</td><td>{_e(r['referral_rate'])}</td><td>{_e(r['ood_rate'])}</td>"
        f"<td>{'<br>'.join(_e(a) for a in r['alerts']) or 'none'}</td></tr>"
        for r in records
    )
    monitoring = (
        f'<div class="chart" id="monitoring-chart">{monitoring_chart(records)}</div><table><tr><th>created at</th>'
        "<th>batch</th><th>images</th><th>class-mix shift</th><th>referral rate</th><th>out-of-distribution rate</th>"
        f"<th>alerts</th></tr>{batches}</table>"
        if records
        else '<p class="empty">No prediction batch recorded yet.</p>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Registry trends</title>'
        f'<style>{style}.chart svg{{max-width:100%;height:auto}}</style></head><body><p><a href="./">Registry</a> · '
        '<a href="compare">Compare two versions</a></p><h1>Trends across versions</h1>'
        f'<section id="versions">{models}</section><h2>Prediction monitoring</h2>'
        f'<section id="monitoring">{monitoring}</section></body></html>'
    )


def _diff_rows(a: dict, b: dict) -> list[tuple[str, object, object]]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _confusion(metrics: dict | None) -> str:
    from dermaops.dataset import CLASSES

    if not metrics or "confusion_matrix" not in metrics:
        return '<p class="empty">No evaluation metrics (the run folder is gone).</p>'
    counts, shares = metrics["confusion_matrix"], metrics["confusion_matrix_normalized"]
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{c}</th>" for c in CLASSES) + "</tr>"
    rows = "".join(
        f"<tr><th>{cls}</th>"
        + "".join(
            f'<td style="background:rgba(43,108,176,{share:.2f});color:{"#fff" if share > 0.5 else "#000"}">{n}</td>'
            for n, share in zip(count_row, share_row, strict=True)
        )
        + "</tr>"
        for cls, count_row, share_row in zip(CLASSES, counts, shares, strict=True)
    )
    return f'<table class="confusion">{head}{rows}</table>'


def _subgroups(a: dict | None, b: dict | None) -> str:
    groups_a = {
        (g["attribute"], g["group"]): g
        for g in (((a or {}).get("test") or {}).get("subgroups") or {}).get("groups", [])
    }
    groups_b = {
        (g["attribute"], g["group"]): g
        for g in (((b or {}).get("test") or {}).get("subgroups") or {}).get("groups", [])
    }
    if not groups_a and not groups_b:
        return '<p class="empty">Neither evaluation recorded subgroups.</p>'
    from dermaops.report import _ci

    rows = []
    for key in list(groups_a) + [k for k in groups_b if k not in groups_a]:
        ga, gb = groups_a.get(key), groups_b.get(key)
        cells = []
        for g in (ga, gb):
            if g is None:
                cells += ["<td>n/a</td>"] * 3
            else:
                small = " (small)" if g["small"] else ""
                cells += [f"<td>{g['n']} / {g['n_mel']}{small}</td>", f"<td>{_e(_ci(g['accuracy']))}</td>",
                          f"<td>{_e(_ci(g['mel_sensitivity']))}</td>"]  # fmt: skip
        rows.append(f"<tr><td>{_e(key[0])}</td><td>{_e(key[1])}</td>{''.join(cells)}</tr>")
    head = (
        '<tr><th rowspan="2">attribute</th><th rowspan="2">group</th><th colspan="3">A</th><th colspan="3">B</th></tr>'
        "<tr>" + "<th>images / mel</th><th>accuracy</th><th>mel sensitivity</th>" * 2 + "</tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def render_compare(found: list[Version], a: Version | None, b: Version | None, style: str) -> str:
    from dermaops.dataset import CLASSES

    def options(chosen: Version | None) -> str:
        return "".join(
            f'<option value="{_e(v.run_id)}"{" selected" if chosen is v else ""}>'
            f"{_e(v.run_id)} ({_e(v.decision)})</option>"
            for v in found
        )

    form = (
        f'<form method="get" action="compare">A <select name="a">{options(a)}</select> B <select name="b">'
        f'{options(b)}</select> <button type="submit">Compare</button></form>'
    )
    body = '<p class="empty">Pick two versions.</p>'
    if a is not None and b is not None:

        def recall(v: Version, cls: str):
            return ((((v.metrics or {}).get("test") or {}).get("per_class") or {}).get(cls) or {}).get("recall")

        def change(cls: str):
            ra, rb = recall(a, cls), recall(b, cls)
            return None if ra is None or rb is None else rb - ra

        recalls = "".join(
            f"<tr><th>{cls}</th><td>{_e(recall(a, cls))}</td><td>{_e(recall(b, cls))}</td>"
            f"<td>{_e(change(cls))}</td></tr>"
            for cls in CLASSES
        )
        figures = "".join(
            f"<tr><th>{html.escape(label)}</th><td>{_e(a.figures.get(k))}</td><td>{_e(b.figures.get(k))}</td></tr>"
            for k, label in TREND_METRICS
        )
        facts = [
            ("dataset version", a.entry.get("dataset_version"), b.entry.get("dataset_version")),
            ("decision", a.decision, b.decision),
            ("decided at", a.decided_at, b.decided_at),
        ]
        recipe = _diff_rows(a.entry.get("recipe") or {}, b.entry.get("recipe") or {})
        recipe_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(x)}</td><td>{_e(y)}</td></tr>" for k, x, y in recipe)
        body = (
            f"<h2>A: {_e(a.run_id)} · B: {_e(b.run_id)}</h2>"
            '<section id="data"><h3>Dataset versions and recipes</h3><table><tr><th></th><th>A</th><th>B</th></tr>'
            + "".join(f"<tr><th>{_e(k)}</th><td>{_e(x)}</td><td>{_e(y)}</td></tr>" for k, x, y in facts)
            + "</table><h4>Recipe settings that differ</h4>"
            + (
                f"<table><tr><th>setting</th><th>A</th><th>B</th></tr>{recipe_rows}</table>"
                if recipe
                else '<p class="empty">The recipes are the same (or not recorded).</p>'
            )  # fmt: skip
            + f'</section><section id="figures"><h3>Headline</h3><table><tr><th></th><th>A</th><th>B</th></tr>{figures}'
            f'</table></section><section id="recall"><h3>Recall per class</h3><table><tr><th>class</th><th>A</th>'
            f"<th>B</th><th>B - A</th></tr>{recalls}</table></section>"
            f'<section id="confusion"><h3>Confusion matrices (counts; shade = row share)</h3><div class="figures">'
            f"<div><h4>A</h4>{_confusion(a.metrics)}</div><div><h4>B</h4>{_confusion(b.metrics)}</div></div></section>"
            f'<section id="subgroups"><h3>Subgroups (images / melanomas, accuracy, melanoma sensitivity)</h3>'
            f"{_subgroups(a.metrics, b.metrics)}</section>"
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Compare versions</title>'
        f'<style>{style}</style></head><body><p><a href="./">Registry</a> · <a href="trends">Trends</a></p>'
        f"<h1>Compare two versions</h1>{form}{body}</body></html>"
    )


def pick(found: list[Version], run_id: str | None) -> Version | None:
    """The version of `run_id`; StageError naming it when the registry has none."""
    if not run_id:
        return None
    for v in found:
        if v.run_id == run_id:
            return v
    raise StageError(f"no version of run {run_id!r} in the registry (known: {', '.join(v.run_id for v in found)})")
