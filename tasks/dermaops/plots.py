"""Training curves from a history (one row per epoch): loss, accuracy and F1, phase boundary marked."""

from __future__ import annotations

from pathlib import Path

CURVES = {
    "loss": (("train_loss", "train (training loss: class weights, smoothing)"), ("val_loss", "validation (plain CE)")),
    "accuracy": (("train_acc", "train"), ("val_acc", "validation")),
    "f1": (
        ("train_macro_f1", "train macro F1"),
        ("val_macro_f1", "validation macro F1"),
        ("train_weighted_f1", "train weighted F1"),
        ("val_weighted_f1", "validation weighted F1"),
    ),
}
TITLES = {"loss": "loss", "accuracy": "accuracy", "f1": "F1"}


def plot_history(history: list[dict], out_dir: Path) -> dict[str, Path]:
    """Write curves_<name>.png for loss, accuracy and f1; returns {file name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [row["epoch"] for row in history]
    phase2 = [row["epoch"] for row in history if row["phase"] == 2]
    written = {}
    for name, series in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, label in series:
            ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=label)
        if phase2 and phase2[0] > epochs[0]:
            ax.axvline(phase2[0] - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(TITLES[name])
        ax.set_title(f"{TITLES[name]} per epoch (dashed line: start of phase 2, fine-tuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"curves_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[path.name] = path
    return written
