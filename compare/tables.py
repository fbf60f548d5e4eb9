"""The tables the comparison prints: step 0, the training trajectory, the ensemble, sharded vs one device."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from compare.metrics import RELATIVE_ERROR_FORMULA

OK, NOT_OK = "[green]✓[/]", "[red]✗[/]"


def _columns(table: Table, names, justify: str = "right") -> Table:
    for name in names:
        table.add_column(name, justify=justify)
    return table


def step0_table(rows, dtype: str) -> Table:
    """One batch through both sides: each quantity's size, errors, tolerance and pass mark."""
    table = Table(
        title=f"Step 0: one batch through both sides ({dtype}); a = NumPy, b = JAX, "
        f"relative error = {RELATIVE_ERROR_FORMULA}"
    )
    table.add_column("quantity", justify="left")
    _columns(table, ("max |b|", "max abs err", "max rel err", "tol"))
    table.add_column("ok", justify="center")
    for r in rows:
        table.add_row(
            r.quantity,
            f"{r.max_abs:.3e}",
            f"{r.max_abs_err:.2e}",
            f"{r.max_rel_err:.2e}",
            f"{r.tol:.0e}",
            OK if r.ok else NOT_OK,
        )
    return table


def epoch_table(rows) -> Table:
    """Per epoch: each side's train loss and test accuracy, the predictions that differ, the drift."""
    table = Table(
        title="Training trajectory: mean train loss, test accuracy, test predictions that differ, max |p_jax - p_numpy|"
    )
    _columns(table, ("epoch", "loss jax", "loss numpy", "acc jax", "acc numpy", "differ", "max drift"))
    for r in rows:
        table.add_row(
            str(r["epoch"]),
            f"{r['train_loss']['jax']:.6f}",
            f"{r['train_loss']['numpy']:.6f}",
            f"{r['test_accuracy']['jax']:.2%}",
            f"{r['test_accuracy']['numpy']:.2%}",
            str(r["disagreements"]),
            f"{r['max_param_drift']:.2e}",
        )
    return table


def ensemble_epoch_table(section: dict) -> Table:
    """Per epoch: the members' mean train loss, the ensemble's accuracy, differences, the largest drift."""
    table = Table(
        title=f"Ensemble of {section['members']} (seeds {section['seeds'][0]}..{section['seeds'][-1]}, "
        f"{section['batches']} batches, ghost batches {section['ghost_batches']}, "
        f"{'pooled' if section['pool_members'] else 'per-member'} statistics): mean train loss over the "
        "members, the ensemble's test accuracy (mean softmax), predictions that differ, max drift"
    )
    _columns(table, ("epoch", "loss jax", "loss numpy", "ens acc jax", "ens acc numpy", "differ", "max drift"))
    for r in section["epochs"]:
        table.add_row(
            str(r["epoch"]),
            f"{np.mean(r['train_loss']['jax']):.6f}",
            f"{np.mean(r['train_loss']['numpy']):.6f}",
            f"{r['ensemble_accuracy']['jax']:.2%}",
            f"{r['ensemble_accuracy']['numpy']:.2%}",
            f"{sum(r['disagreements'])} + {r['ensemble_disagreements']}",
            f"{max(r['max_param_drift']):.2e}",
        )
    return table


def ensemble_members_table(section: dict) -> Table:
    """After the last epoch, per member and for the ensemble: accuracy on each side, differences, drift."""
    last = section["epochs"][-1]
    table = Table(title="After the last epoch, per member: test accuracy on each side, predictions that differ, drift")
    _columns(table, ("member", "seed", "acc jax", "acc numpy", "differ", "max drift"))
    for m, seed in enumerate(section["seeds"]):
        table.add_row(
            str(m),
            str(seed),
            f"{last['test_accuracy']['jax'][m]:.2%}",
            f"{last['test_accuracy']['numpy'][m]:.2%}",
            str(last["disagreements"][m]),
            f"{last['max_param_drift'][m]:.2e}",
        )
    table.add_row(
        "ensemble",
        "mean softmax",
        f"{last['ensemble_accuracy']['jax']:.2%}",
        f"{last['ensemble_accuracy']['numpy']:.2%}",
        str(last["ensemble_disagreements"]),
        "",
        style="bold",
    )
    return table


def print_ensemble(section: dict, console: Console) -> None:
    """The ensemble's per-epoch table, its per-member table, the identity check and the timings."""
    console.print(ensemble_epoch_table(section))
    console.print(ensemble_members_table(section))
    if isinstance(section["identity"], str):
        console.print(f"  identity check {section['identity']}")
    else:
        for r in section["identity"]:
            console.print(
                f"  identity ({r['side']:>5}): member {r['member']} of the ensemble vs the single model trained alone "
                f"from seed {r['seed']}: max |p_ens - p_single| = {r['max_abs_diff']:.2e} (tol {r['tol']:.0e}) "
                + (OK if r["ok"] else NOT_OK)
            )
    for key, t in section["timings"].items():
        console.print(
            f"  ensemble {key:>5}: {t['train_s']:.2f} s training, {t['member_samples_per_s']:,.0f} member-samples/s "
            f"(+ {t['compile_s']:.2f} s compile/warm-up)"
        )
    console.print(f"  JAX epoch programs compiled in this process: {section['jax_compilations']}")


def single_device_table(rows) -> Table:
    """Per epoch: the sharded JAX side against the same training on one device."""
    table = Table(
        title="Sharded vs one device: the same training, batch split over the devices (max |p_sharded - p_single|)"
    )
    _columns(table, ("epoch", "loss sharded", "loss 1 device", "max param diff", "max state diff", "preds differ"))
    for r in rows:
        table.add_row(
            str(r["epoch"]),
            f"{r['loss_sharded']:.6f}",
            f"{r['loss_single_device']:.6f}",
            f"{r['max_param_diff']:.2e}",
            f"{r['max_state_diff']:.2e}",
            str(r["predictions_differ"]),
        )
    return table


def print_outcome(console: Console, failures, passed: str | None, notes=()) -> int:
    """One ``FAIL`` line per failure, then one ``note`` line per note, then ``PASS: passed`` if
    nothing failed (and ``passed`` is given: None where nothing was compared); returns the
    command's exit status (1 if anything failed)."""
    for line in failures:
        console.print(f"[bold red]FAIL[/] {line}")
    for line in notes:
        console.print(f"[yellow]note[/] {line}")
    if not failures and passed is not None:
        console.print(f"[bold green]PASS[/]: {passed}")
    return 1 if failures else 0
