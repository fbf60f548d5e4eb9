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
        from compare.ensemble_run import plot_ensemble_panel

        plot_ensemble_panel(axes[3], ensemble, JAX_STYLE, NUMPY_STYLE)

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
