"""What the model registry holds, read from S3 and rendered as one HTML page (the Airflow UI's
"Model registry" view, plugins/dermaops_registry) or as JSON.

Everything comes from the registry prefix (dermaops.promotion's layout) and from the champion run's
evaluation folder: `champion.json`, `history/*.json`, the champion's `model_card.md` beside its
checkpoint, and `runs/<run_id>/evaluation/{report.md, confusion_matrix*.png, gradcam_mel.png}`.
The evaluation folder is the champion's run prefix (its `source_model_uri` is
`<run prefix>/models/cnn/cnn.pt`, the DAG's layout) plus `evaluation/`.

The page is built with html.escape on every stored value and markdown rendered with raw HTML
disabled: the registry's contents come from pipeline runs, not from the viewer, and must not be
able to inject script into the Airflow UI's origin.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from dermaops.errors import StageError
from dermaops.metrics import champion_operating_point_line
from dermaops.store import ArtifactStore, S3Uri

# Files of the champion's evaluation folder the view shows (and the only ones it serves).
EVALUATION_IMAGES = {
    "confusion_matrix.png": "Confusion matrix (counts)",
    "confusion_matrix_normalized.png": "Confusion matrix (row-normalised: diagonal = recall)",
    "gradcam_mel.png": "Grad-CAM of the melanoma score",
}
REPORT = "report.md"
MODEL_CARD = "model_card.md"
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "mel_recall")


def evaluation_prefix(champion: dict) -> S3Uri | None:
    """runs/<run_id>/evaluation of the champion's run, from its source_model_uri; None if not in that layout."""
    source = champion.get("source_model_uri") or ""
    if "/models/" not in source:
        return None
    return S3Uri.parse(source.rsplit("/models/", 1)[0]).join("evaluation")


@dataclass
class RegistrySnapshot:
    registry: S3Uri
    champion: dict | None
    problem: str  # why champion.json could not be read ("" when fine or absent)
    history: list[dict] = field(default_factory=list)  # newest first
    evaluation: S3Uri | None = None
    report_md: str | None = None
    images: list[str] = field(default_factory=list)  # EVALUATION_IMAGES present in S3
    model_card_md: str | None = None

    def as_json(self) -> dict:
        return {
            "registry": str(self.registry),
            "champion": self.champion,
            "problem": self.problem or None,
            "history": self.history,
            "evaluation_uri": str(self.evaluation) if self.evaluation else None,
            "images": self.images,
            "has_report": self.report_md is not None,
            "has_model_card": self.model_card_md is not None,
        }


def _text(store: ArtifactStore, uri: S3Uri) -> str | None:
    return store.get_bytes(uri).decode("utf-8", errors="replace") if store.exists(uri) else None


def read_registry(store: ArtifactStore, registry: S3Uri) -> RegistrySnapshot:
    """The registry as it is now. A missing champion is a state, not an error; transient S3 errors raise."""
    from dermaops.promotion import Registry

    reg = Registry(store, registry)
    champion, problem = reg.champion_record()
    history = list(reversed(reg.history()))
    snap = RegistrySnapshot(registry, champion, problem, history)
    if champion is None:
        return snap
    card = S3Uri.parse(champion["model_uri"]).key.rsplit("/", 1)[0]
    snap.model_card_md = _text(store, S3Uri(registry.bucket, f"{card}/{MODEL_CARD}"))
    snap.evaluation = evaluation_prefix(champion)
    if snap.evaluation is not None:
        snap.report_md = _text(store, snap.evaluation.join(REPORT))
        snap.images = [name for name in EVALUATION_IMAGES if store.exists(snap.evaluation.join(name))]
    return snap


def evaluation_image(store: ArtifactStore, registry: S3Uri, name: str) -> bytes:
    """One of the champion's evaluation PNGs; StageError for any other name or when it is absent."""
    if name not in EVALUATION_IMAGES:
        raise StageError(f"{name!r} is not an evaluation image (allowed: {', '.join(EVALUATION_IMAGES)})")
    from dermaops.promotion import Registry

    champion, _ = Registry(store, registry).champion_record()
    prefix = evaluation_prefix(champion) if champion else None
    if prefix is None:
        raise StageError(f"no champion with an evaluation folder in {registry}")
    return store.get_bytes(prefix.join(name))


# -- rendering ---------------------------------------------------------------------------------
def render_markdown(text: str, image_base: str = "") -> str:
    """Markdown -> HTML (CommonMark + tables, raw HTML escaped); relative image links are served from
    `image_base` (the view's artifact route), since the report links its PNGs by bare name."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                src = str(child.attrGet("src") or "")
                if src in EVALUATION_IMAGES:
                    child.attrSet("src", image_base + src)
    return md.renderer.render(tokens, md.options, {})


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _e(value) -> str:
    return html.escape(_fmt(value))


def _metrics_table(metrics: dict) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in HEADLINE if k in metrics)
    cells = "".join(f"<td>{_e(metrics[k])}</td>" for k in HEADLINE if k in metrics)
    recall = metrics.get("recall") or {}
    per_class = "".join(f"<th>{html.escape(c)}</th>" for c in recall)
    recalls = "".join(f"<td>{_e(v)}</td>" for v in recall.values())
    out = f"<table><tr>{head}</tr><tr>{cells}</tr></table>"
    if recall:
        out += f"<h4>Recall per class</h4><table><tr>{per_class}</tr><tr>{recalls}</tr></table>"
    return out


def _champion_section(snap: RegistrySnapshot) -> str:
    if snap.champion is None:
        why = html.escape(snap.problem) if snap.problem else "no model has been promoted yet"
        return f'<section id="champion"><h2>Champion</h2><p class="empty">No champion: {why}.</p></section>'
    c = snap.champion
    facts = [
        ("run", c.get("run_id")),
        ("decided at", c.get("decided_at")),
        ("dataset version", c.get("dataset_version")),
        ("model", f"{c.get('arch')} at {c.get('image_size')} px"),
        ("checkpoint", c.get("model_uri")),
        ("sha256", c.get("model_sha256")),
        ("primary metric", c.get("primary_metric")),
        ("melanoma operating point", champion_operating_point_line(c)),
        ("why it won", c.get("reason")),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    card = ' <a href="model-card">Model card</a>' if snap.model_card_md is not None else ""
    return (
        f'<section id="champion"><h2>Champion{card}</h2><table class="facts">{rows}</table>'
        f"<h3>Test metrics at promotion</h3>{_metrics_table(c.get('metrics') or {})}</section>"
    )


def _history_section(snap: RegistrySnapshot) -> str:
    if not snap.history:
        return '<section id="history"><h2>Decision history</h2><p class="empty">No decision yet.</p></section>'
    rows = []
    for h in snap.history:
        m = (h.get("challenger") or {}).get("metrics") or {}
        rows.append(
            f'<tr class="{_e(h.get("decision"))}"><td>{_e(h.get("decided_at"))}</td><td>{_e(h.get("run_id"))}</td>'
            f"<td>{_e(h.get('decision'))}</td><td>{_e(m.get('macro_f1'))}</td><td>{_e(m.get('mel_recall'))}</td>"
            f"<td>{_e(h.get('reason'))}</td></tr>"
        )
    head = (
        "<tr><th>decided at</th><th>run</th><th>decision</th><th>macro F1</th><th>mel recall</th><th>reason</th></tr>"
    )
    return f'<section id="history"><h2>Decision history</h2><table>{head}{"".join(rows)}</table></section>'


def _evaluation_section(snap: RegistrySnapshot, base: str) -> str:
    if snap.champion is None:
        return ""
    figures = "".join(
        f'<figure><img src="{base}artifacts/{name}" alt="{html.escape(EVALUATION_IMAGES[name])}">'
        f"<figcaption>{html.escape(EVALUATION_IMAGES[name])}</figcaption></figure>"
        for name in snap.images
    )
    where = html.escape(str(snap.evaluation)) if snap.evaluation else "unknown"
    report = (
        f'<article class="report">{render_markdown(snap.report_md, base + "artifacts/")}</article>'
        if snap.report_md is not None
        else f'<p class="empty">No report.md in {where}.</p>'
    )
    return (
        f'<section id="evaluation"><h2>Champion evaluation</h2><p>From <code>{where}</code></p>'
        f'<div class="figures">{figures}</div><h2>Run report</h2>{report}</section>'
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1a202c;max-width:1200px}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #cbd5e0;padding:.25rem .5rem;
text-align:left;vertical-align:top;font-size:.9rem}th{background:#edf2f7}.facts th{width:14rem}
tr.promoted td{background:#f0fff4}tr.refused td{background:#fff5f5}.empty{color:#718096}
.figures{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figure img{max-width:560px;border:1px solid #e2e8f0}
.report img{max-width:100%}code{word-break:break-all}
"""


def render_page(snap: RegistrySnapshot, base: str = "") -> str:
    """The whole page. `base` prefixes the page's own links (relative: empty when served at the view's root)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>DermaOps model registry</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>HAM10000 model registry</h1><p><code>{html.escape(str(snap.registry))}</code></p>"
        f'<p><a href="{base}trends">Trends across versions and prediction monitoring</a> · '
        f'<a href="{base}compare">Compare two versions</a></p>'
        f"{_champion_section(snap)}{_history_section(snap)}{_evaluation_section(snap, base)}</body></html>"
    )


def render_card_page(snap: RegistrySnapshot) -> str:
    body = render_markdown(snap.model_card_md) if snap.model_card_md is not None else "<p>No model card.</p>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Model card</title>'
        f'<style>{STYLE}</style></head><body><p><a href="./">Back to the registry</a></p>{body}</body></html>'
    )
