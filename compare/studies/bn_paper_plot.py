"""``bn_paper.png``: the layout of Figure 1 of Ioffe & Szegedy (2015), from ``bn_paper.json``.

(a) test accuracy against training steps, both networks, the JAX side (wide, light) under the
NumPy side (thin, dashed); (b) without and (c) with batch norm: the 15th, 50th and 85th
percentiles of the input of the followed sigmoid, the band behind them the same percentiles of all
units of the layer pooled. (b) and (c) share their vertical axis, so their widths compare.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

NETWORK_COLORS = {"no_batch_norm": "#d62728", "batch_norm": "#1f77b4"}
NETWORK_LABELS = {"no_batch_norm": "without batch norm", "batch_norm": "with batch norm"}
PERCENTILE_COLORS = ("#9467bd", "#2ca02c", "#ff7f0e")  # 15th, 50th, 85th
JAX_LINE = dict(linewidth=5, alpha=0.35, solid_capstyle="butt")
NUMPY_LINE = dict(linewidth=1.3, linestyle=(0, (4, 2)))


def plot_bn_paper(report: dict, path: Path) -> None:
    """Write :func:`bn_paper_figure` of ``report`` to ``path`` (PNG)."""
    fig = bn_paper_figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bn_paper_figure(report: dict) -> plt.Figure:
    config = report["config"]
    fig, (acc_ax, off_ax, on_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    _accuracy_panel(acc_ax, report)
    limits = _percentile_limits(report)
    for ax, name, letter in ((off_ax, "no_batch_norm", "b"), (on_ax, "batch_norm", "c")):
        _percentile_panel(ax, report, name, letter, limits)
    unit, layer = report["protocol"]["unit"], report["protocol"]["layer"]
    apart = ", ".join(f"{report[name]['max_param_diff']:.1e} {NETWORK_LABELS[name]}" for name in NETWORK_LABELS)
    fig.suptitle(
        f"Ioffe & Szegedy (2015), Figure 1, on MNIST: weights N(0, {config['init_std']}²), "
        f"plain SGD lr {config['lr']}, batch {config['batch_size']}, {config['dtype']}, seed {config['seed']}. "
        f"(b, c): input of sigmoid {unit} of hidden layer {layer + 1} over the {report['protocol']['n_test']:,} "
        f"test images, eval mode.\nJAX side vs NumPy side at the end, max |p_jax − p_numpy|: {apart}",
        fontsize=10.5,
    )
    fig.legend(handles=_legend_handles(report), loc="lower center", ncol=4, fontsize=9.5, frameon=False)
    fig.tight_layout(rect=(0, 0.11, 1, 0.93))
    return fig


def _steps_axis(ax) -> None:
    ax.set_xlabel("training steps")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))
    ax.grid(alpha=0.3)


def _legend_handles(report: dict) -> list:
    """One legend for the three panels, under them (inside, it would hide some run's curves)."""
    line = plt.Line2D
    handles = [
        line([], [], color="0.3", **JAX_LINE, label="JAX side (per example, vmap + pmean)"),
        line([], [], color="0.1", **NUMPY_LINE, label="NumPy side (batched, handwritten backward)"),
    ]
    for name in ("no_batch_norm", "batch_norm"):
        final = report[name]["final_test_accuracy"]
        text = f"{100 * final['jax']:.2f} %"
        if final["jax"] != final["numpy"]:
            text = f"{100 * final['jax']:.2f} % (JAX) / {100 * final['numpy']:.2f} % (NumPy)"
        label = f"(a) {NETWORK_LABELS[name]}: final {text}"
        handles.append(line([], [], color=NETWORK_COLORS[name], linewidth=3, label=label))
    unit = report["protocol"]["unit"]
    for percentile, color in zip(report["protocol"]["percentiles"], PERCENTILE_COLORS):
        handles.append(
            line([], [], color=color, linewidth=3, label=f"(b, c) sigmoid {unit}: {percentile}th percentile")
        )
    handles.append(plt.Rectangle((0, 0), 1, 1, color="0.88", label="(b, c) 15th–85th, all units of the layer"))
    return handles


def _accuracy_panel(ax, report: dict) -> None:
    lows = []
    for name in ("no_batch_norm", "batch_norm"):
        run, color = report[name], NETWORK_COLORS[name]
        steps = run["steps"]
        for side, style in (("jax", JAX_LINE), ("numpy", NUMPY_LINE)):
            ax.plot(steps, run["test_accuracy"][side], color=color, **style)
        later = [a for s, a in zip(steps, run["test_accuracy"]["numpy"]) if s >= 0.2 * steps[-1]]
        lows.append(min(later))
    # as the paper: the axis starts where the later part of the curves lives (early steps fall below)
    bottom = min(0.7, np.floor(min(lows) * 20) / 20)
    ax.set_ylim(max(0.0, bottom), 1.0)
    ax.set(ylabel="test accuracy", title="(a) test accuracy (eval mode)")
    _steps_axis(ax)


def _percentile_limits(report: dict) -> tuple[float, float]:
    """One vertical range for (b) and (c): the followed unit's curves of both networks, with a margin."""
    values = np.array(
        [report[name]["percentiles"][side] for name in ("no_batch_norm", "batch_norm") for side in ("jax", "numpy")]
    )
    low, high = float(values.min()), float(values.max())
    margin = 0.08 * (high - low) or 1.0
    return low - margin, high + margin


def _percentile_panel(ax, report: dict, name: str, letter: str, limits) -> None:
    run = report[name]
    steps = run["steps"]
    pooled = np.asarray(run["percentiles_all_units"]["numpy"])
    ax.fill_between(steps, pooled[:, 0], pooled[:, 2], color="0.88", linewidth=0)
    for k, color in enumerate(PERCENTILE_COLORS):
        for side, style in (("jax", JAX_LINE), ("numpy", NUMPY_LINE)):
            curve = np.asarray(run["percentiles"][side])[:, k]
            ax.plot(steps, curve, color=color, **style)
    ax.set_ylim(*limits)
    ax.set(ylabel="input of the sigmoid", title=f"({letter}) {NETWORK_LABELS[name]}: 15th, 50th, 85th percentiles")
    _steps_axis(ax)
