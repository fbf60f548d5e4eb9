"""The bench's output: its tables (the machine's peak among them), one verdict line per dtype and thread
count, and ``bench.png``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
from rich.table import Table

from compare.bench.ensemble import is_ensemble_row
from compare.bench.limit import LIMIT_KEY
from compare.bench.rows import EPOCH_BATCH_SIZE, LOADED_BATCH_SIZE
from compare.bench.timing import BUSY_THRESHOLD

#: The plot's default line (a row's style overrides it).
LINE = dict(linewidth=1.8, markersize=6)


def _label(labels: dict, key: tuple[str, str]) -> str:
    return labels.get(key, f"{key[0]} {key[1]}")


def _busy(r: dict) -> str:
    return "[red]*[/]" if r["other_cpu"] > BUSY_THRESHOLD else ""


def _table(title: str, names, left=("implementation",)) -> Table:
    table = Table(title=title)
    for name in names:
        table.add_column(name, justify="left" if name in left else "right")
    return table


def _of_peak(r: dict) -> str:
    return f" ({r['fraction_of_peak']:.0%} of peak)" if r.get("fraction_of_peak") else ""


def step_table(step_rows: list[dict], labels: dict, dtype: str, threads: int) -> Table:
    """Samples/s of a training step per implementation and batch size, with each one's share of the
    limit; the limit's cells name the engine that set it, and a row under it gives its GFLOP/s."""
    sizes = sorted({r["batch_size"] for r in step_rows})
    peak = next((r["peak_flops_per_s"] for r in step_rows if r.get("peak_flops_per_s")), None)
    peak_text = f"; peak {peak / 1e9:,.0f} GFLOP/s" if peak else ""
    table = Table(
        title=f"{dtype}, {threads} thread{'s' if threads > 1 else ''}: samples/s of a training step "
        f"(share of the limit, the fastest engine in each repeat{peak_text}; * = other processes busy)"
    )
    table.add_column("implementation", no_wrap=True)
    for b in sizes:
        table.add_column(f"B={b}", justify="right")

    def cell(key, b, text):
        match = [r for r in step_rows if (r["impl"], r["mode"]) == key and r["batch_size"] == b]
        return text(match[0]) if match else ""

    for key in dict.fromkeys((r["impl"], r["mode"]) for r in step_rows):
        if key == LIMIT_KEY:
            engine_cells = (
                cell(key, b, lambda r: f"{r['samples_per_s'] / 1e3:,.0f}k {r['limit_engine']}{_busy(r)}") for b in sizes
            )
            table.add_row(_label(labels, key), *engine_cells)
            table.add_row(
                "  the limit's GFLOP/s",
                *(cell(key, b, lambda r: f"{r['limit_gflops']:,.0f}{_of_peak(r)}") for b in sizes),
            )
            continue
        table.add_row(
            _label(labels, key),
            *(
                cell(key, b, lambda r: f"{r['samples_per_s'] / 1e3:,.0f}k ({r['fraction_of_limit']:.0%}){_busy(r)}")
                for b in sizes
            ),
        )
    return table


def peak_table(peaks: list[dict]) -> Table:
    """The machine's peak: GFLOP/s of one large square product per dtype and thread count, per engine."""
    names = sorted({name for p in peaks for name in p["engines"]})
    n = peaks[0]["n"]
    table = _table(f"The machine's peak: GFLOP/s of one {n} x {n} product", ("dtype", "threads", "peak", *names))
    for p in peaks:
        engines = [f"{p['engines'][name] / 1e9:,.1f}" if name in p["engines"] else "" for name in names]
        table.add_row(p["dtype"], str(p["threads"]), f"{p['flops_per_s'] / 1e9:,.1f} ({p['engine']})", *engines)
    return table


def loaded_table(loaded: list[dict], labels: dict) -> Table:
    """Each row under load against the same row idle."""
    names = ("implementation", "dtype", "threads", "idle samples/s", "loaded samples/s", "slowdown")
    table = _table(f"Under load: B={LOADED_BATCH_SIZE} while {os.cpu_count()} spinning processes compete", names)
    for r in loaded:
        key = (r["impl"], r["mode"])
        table.add_row(
            _label(labels, key),
            r["dtype"],
            str(r["threads"]),
            f"{r['samples_per_s'] * r['slowdown']:,.0f}",
            f"{r['samples_per_s']:,.0f}",
            f"{r['slowdown']:.2f}x",
        )
    return table


def epoch_table(epoch_rows: list[dict]) -> Table:
    """A whole MNIST epoch per implementation."""
    names = ("implementation", "dtype", "threads", "seconds", "samples/s", "share of limit", "GFLOP/s")
    table = _table(f"A whole MNIST epoch ({epoch_rows[0]['epoch_samples']:,} images, batch {EPOCH_BATCH_SIZE})", names)
    for r in epoch_rows:
        table.add_row(
            r["impl"],
            r["dtype"],
            str(r["threads"]),
            f"{r['epoch_seconds']:.3f}",
            f"{r['samples_per_s']:,.0f}{_busy(r)}",
            f"{r['fraction_of_limit']:.0%} ({r['limit_engine']})",
            f"{r['flops_per_s'] / 1e9:,.0f}{_of_peak(r)}",
        )
    return table


def ensemble_table(ensemble: list[dict]) -> Table:
    """The ensemble rows in member-samples/s, with their speed-up over the same side's single models."""
    names = ("implementation", "row", "dtype", "threads", "member-samples/s", "speed-up")
    table = _table(
        f"Ensemble of {ensemble[0]['members']}, B={ensemble[0]['batch_size']}: member-samples/s "
        "(speed-up over the same side's single models one after another; * = other processes busy)",
        names,
        left=("implementation", "row"),
    )
    for r in ensemble:
        table.add_row(
            r["impl"],
            r["mode"],
            r["dtype"],
            str(r["threads"]),
            f"{r['samples_per_s']:,.0f}{_busy(r)}",
            f"x{r['speedup_vs_single']:.2f}",
        )
    return table


def tables(rows: list[dict], labels: dict) -> list[Table]:
    """Every table of a run's rows: per dtype and thread count, under load, whole epochs, the ensemble."""
    ensemble = [r for r in rows if is_ensemble_row(r)]
    rows = [r for r in rows if not is_ensemble_row(r)]
    idle = [r for r in rows if not r["under_load"]]
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in idle):
        for threads in sorted({r["threads"] for r in idle}):
            step_rows = [r for r in idle if r["dtype"] == dtype and r["threads"] == threads and r["mode"] != "epoch"]
            if step_rows:
                out.append(step_table(step_rows, labels, dtype, threads))
    loaded = [r for r in rows if r["under_load"]]
    epoch_rows = [r for r in idle if r["mode"] == "epoch"]
    out += [loaded_table(loaded, labels)] if loaded else []
    out += [epoch_table(epoch_rows)] if epoch_rows else []
    out += [ensemble_table(ensemble)] if ensemble else []
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """At batch 128: the numba FastTrainer against JAX's fastest training row, and each side's
    slowdown under load, per dtype and thread count (all from the same worker's rounds)."""
    lines = []
    rows = [r for r in rows if not is_ensemble_row(r)]
    training_modes = {"scan", "jit-step", "epoch"}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for threads in sorted({r["threads"] for r in rows}):
            here = [
                r
                for r in rows
                if r["dtype"] == dtype and r["threads"] == threads and r["batch_size"] == EPOCH_BATCH_SIZE
            ]
            idle = [r for r in here if not r["under_load"]]
            numba_rows = [r for r in idle if r["impl"] == "numba" and r["mode"] in ("fast", "epoch")]
            jax_rows = [r for r in idle if r["impl"] == "jax" and r["mode"] in training_modes]
            if numba_rows and jax_rows:
                ours = max(numba_rows, key=lambda r: r["fraction_of_limit"])
                best = max(jax_rows, key=lambda r: r["fraction_of_limit"])
                ratio = ours["fraction_of_limit"] / best["fraction_of_limit"]
                lines.append(
                    f"{dtype}, {threads} thread(s), B={EPOCH_BATCH_SIZE}: numba {ours['mode']} "
                    f"{ours['fraction_of_limit']:.0%} of the limit, JAX {best['mode']} "
                    f"{best['fraction_of_limit']:.0%}: ratio {ratio:.2f}"
                )
            slow = {r["impl"]: r["slowdown"] for r in here if r["under_load"] and r["mode"] in ("fast", "scan")}
            if "numba" in slow and "jax" in slow:
                lines.append(
                    f"{dtype}, {threads} thread(s), under load: numba fast {slow['numba']:.2f}x slower, "
                    f"JAX scan {slow['jax']:.2f}x: ratio {slow['numba'] / slow['jax']:.2f}"
                )
    return lines


def plot(rows: list[dict], path: Path, labels: dict, styles: dict) -> None:
    """``bench.png``: samples/s against the batch size, one panel per dtype and thread count; the
    limit's points name the engine that set them, the engines' own lines are dotted."""
    step_rows = [r for r in rows if r["mode"] != "epoch" and not r["under_load"] and not is_ensemble_row(r)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in step_rows))
    thread_counts = sorted({r["threads"] for r in step_rows})
    fig, axes = plt.subplots(
        len(thread_counts), len(dtypes), figsize=(6.5 * len(dtypes), 4.6 * len(thread_counts)), squeeze=False
    )
    for ax_row, threads in zip(axes, thread_counts):
        for ax, dtype in zip(ax_row, dtypes):
            here = [r for r in step_rows if r["dtype"] == dtype and r["threads"] == threads]
            for key in dict.fromkeys((r["impl"], r["mode"]) for r in here):
                series = sorted((r["batch_size"], r["samples_per_s"]) for r in here if (r["impl"], r["mode"]) == key)
                ax.plot(*zip(*series), label=_label(labels, key).strip(), **{**LINE, **styles.get(key, {})})
            for r in here:  # which engine set the limit
                if (r["impl"], r["mode"]) == LIMIT_KEY:
                    ax.annotate(
                        r["limit_engine"], (r["batch_size"], r["samples_per_s"]), xytext=(0, 6),
                        textcoords="offset points", ha="center", fontsize=7,
                    )  # fmt: skip
            title = f"training step, {dtype}, {threads} thread{'s' if threads > 1 else ''}"
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples / s", title=title)
            ax.margins(x=0.08, y=0.12)  # room for the engines' names above the limit
            sizes = sorted({r["batch_size"] for r in here})
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.xaxis.set_minor_formatter(NullFormatter())  # the batch sizes only, also over a short range
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
