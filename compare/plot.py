"""``output.png``: the two sides' training curves overlaid, and the distance between them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

JAX_STYLE = dict(color="#1f77b4", linewidth=2.5, marker="o", markersize=7, alpha=0.8)
NUMPY_STYLE = dict(color="#ff7f0e", linewidth=1.5, linestyle="--", marker="x", markersize=8)


def plot_comparison(report: dict, path: Path) -> None:
    """Write :func:`comparison_figure` of ``report`` to ``path`` (PNG)."""
    fig = comparison_figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_figure(report: dict) -> plt.Figure:
    """Three panels: test accuracy per epoch, train loss per epoch (both sides overlaid), and the
    max parameter drift ``max |p_jax - p_numpy|`` on a log axis. The two sides' legend sits under
    the panels, where it cannot hide a point."""
    rows = report["epochs"]
    epochs = [r["epoch"] for r in rows]
    titles = report["sides"]
    ensemble = report.get("ensemble")  # compare/run.py --ensemble M: a fourth panel
    fig, axes = plt.subplots(1, 4 if ensemble else 3, figsize=(20 if ensemble else 15, 4.4))
    acc_ax, loss_ax, drift_ax = axes[:3]

    for key, style in (("jax", JAX_STYLE), ("numpy", NUMPY_STYLE)):
        acc_ax.plot(epochs, [100 * r["test_accuracy"][key] for r in rows], label=titles[key], **style)
        loss_ax.plot(epochs, [r["train_loss"][key] for r in rows], label=titles[key], **style)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (eval mode)")
    loss_ax.set(xlabel="epoch", ylabel="mean train loss", title="Train loss", yscale="log")

    drift = [max(r["max_param_drift"], 1e-300) for r in rows]
    drift_ax.semilogy(epochs, drift, color="#2ca02c", marker="s", linewidth=2)
    tol = report["tolerances"]["max_param_drift"]
    drift_ax.axhline(tol, color="#d62728", linestyle=":", label=f"tolerance {tol:g}")
    eps = report["config"]["machine_epsilon"]
    drift_ax.axhline(eps, color="gray", linestyle="-.", label=f"{report['config']['dtype']} epsilon {eps:.1e}")
    drift_ax.set(xlabel="epoch", ylabel="max |p_jax - p_numpy|", title="Parameter drift between the sides")
    drift_ax.legend(fontsize=8)
    for ax in (acc_ax, loss_ax, drift_ax):
        ax.grid(alpha=0.3, which="both")
        ax.set_xticks(epochs)

    if ensemble:
        ensemble_panel(axes[3], ensemble)

    disagree = sum(r["disagreements"] for r in rows[-1:])
    fig.suptitle(
        f"Same initial parameters, same batches: {report['config']['dtype']}, "
        f"{report['config']['epochs']} epochs, batch {report['config']['batch_size']} — "
        f"final disagreements on the test set: {disagree}",
        fontsize=11,
    )
    fig.legend(*acc_ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def ensemble_panel(ax, section: dict) -> None:
    """``output.png``'s ensemble panel: every member's test accuracy per epoch (thin lines) and the
    ensemble's (mean softmax, thick), JAX and NumPy drawn over each other."""
    epochs = [r["epoch"] for r in section["epochs"]]
    for key, style in (("jax", JAX_STYLE), ("numpy", NUMPY_STYLE)):
        thin = {**style, "linewidth": 0.8, "markersize": 3, "alpha": 0.5}
        for m in range(section["members"]):
            label = f"{key}: members" if m == 0 else None
            ax.plot(epochs, [100 * r["test_accuracy"][key][m] for r in section["epochs"]], label=label, **thin)
        ax.plot(
            epochs, [100 * r["ensemble_accuracy"][key] for r in section["epochs"]], label=f"{key}: ensemble", **style
        )
    pooled = "pooled BN" if section["pool_members"] else "per-member BN"
    ax.set(
        xlabel="epoch", ylabel="test accuracy (%)", title=f"Ensemble of {section['members']}: members and mean softmax"
    )
    ax.text(
        0.02,
        0.97,
        f"{section['batches']} batches, {pooled}, ghost batches {section['ghost_batches']}",
        transform=ax.transAxes,
        fontsize=8,
        va="top",
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    ax.set_xticks(epochs)


def accuracy_figure(test_accuracy: list[float], title: str) -> plt.Figure:
    """Test accuracy per epoch of one training run (``vmap-bn-train-jax``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(test_accuracy) + 1)
    ax.plot(epochs, [100 * a for a in test_accuracy], marker="o")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
