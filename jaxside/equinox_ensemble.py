"""An ensemble of Equinox MLPs (``eqx.nn.BatchNorm``) in one nested vmap, and what Equinox #707 needs.

The pattern: the members' array leaves stacked on axis 0, ``eqx.filter_vmap(..., axis_name="member")``
around the usual ``jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")``. Each
member's ``eqx.nn.State`` is stacked too and leaves the member vmap batched (``out_axes=0``): its
statistics differ per member. With ``BatchNorm(axis_name=("member", "batch"))`` the statistics are
pooled over both axes (the ``[samples, batch]`` case of #707), which needs the outer vmap to bind
``"member"``. Equinox's ``momentum`` is a static field, so it cannot be traced or differ per member
inside one vmapped program (``tests/test_equinox_ensemble.py`` shows the errors).

Equinox's conventions (momentum of the OLD statistic, biased running variance) are those of
:mod:`jaxside.equinox_model`, whose :class:`~jaxside.equinox_model.MLP` is reused here.
"""

from __future__ import annotations

import operator

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from compare.contract import ensemble as ensemble_contract
from jaxside.equinox_model import DEBIAS_OFF_COUNTER, MLP
from jaxside.layers import BATCH_AXIS
from jaxside.model import check_float64_enabled

MEMBER_AXIS = "member"


def member_from_params(params, state, axis_name, dtype) -> tuple[MLP, eqx.nn.State]:
    """One member in our layout -> ``(MLP, State)`` whose BatchNorms reduce over ``axis_name`` (a name
    or a tuple of names); Equinox's counter at :data:`~jaxside.equinox_model.DEBIAS_OFF_COUNTER`."""
    batch_norm = "gamma" in params[0]
    model, eqx_state = eqx.nn.make_with_state(MLP)(
        batch_norm=batch_norm, dtype=dtype, key=jax.random.PRNGKey(0), axis_name=axis_name
    )
    linears = [
        eqx.tree_at(lambda lin: lin.weight, lin, jnp.asarray(layer["weight"], dtype).T)
        for lin, layer in zip(model.linears, params)
    ]
    linears = [
        eqx.tree_at(lambda lin: lin.bias, lin, jnp.asarray(layer["bias"], dtype)) if "bias" in layer else lin
        for lin, layer in zip(linears, params)
    ]
    norms = []
    for norm, layer, stats in zip(model.norms, params, state):
        norms.append(
            eqx.tree_at(
                lambda bn: (bn.weight, bn.bias), norm, (jnp.asarray(layer["gamma"]), jnp.asarray(layer["beta"]))
            )
        )
        eqx_state = eqx_state.set(norm.batch_state_index, (jnp.asarray(stats["mean"]), jnp.asarray(stats["var"])))
        counter = eqx_state.get(norm.batch_counter)
        eqx_state = eqx_state.set(norm.batch_counter, jnp.full_like(counter, DEBIAS_OFF_COUNTER))
    return eqx.tree_at(lambda m: (m.linears, m.norms), model, (tuple(linears), tuple(norms))), eqx_state


def _stack(trees):
    """Stack the array leaves of equally shaped pytrees on a new axis 0 (other leaves: the first's)."""
    return jtu.tree_map(lambda *leaves: jnp.stack(leaves) if eqx.is_array(leaves[0]) else leaves[0], *trees)


def from_ensemble_params(params, state, *, pool_members: bool = False) -> tuple[MLP, eqx.nn.State]:
    """Our stacked layout -> one ``MLP`` and one ``eqx.nn.State`` whose arrays carry the member axis.

    Equinox's batch counter is stored at :data:`~jaxside.equinox_model.DEBIAS_OFF_COUNTER`, so its
    eval mode uses the running statistics as they are. ``pool_members`` gives the BatchNorms the
    axis tuple ``("member", "batch")``.
    """
    n_members, batch_norm, dtype = ensemble_contract.check_ensemble_params(params)
    ensemble_contract.check_ensemble_state(state, n_members, batch_norm, dtype)
    check_float64_enabled(dtype)
    axis_name = (MEMBER_AXIS, BATCH_AXIS) if pool_members else BATCH_AXIS
    take = lambda tree, k: [{key: np.asarray(v)[k] for key, v in layer.items()} for layer in tree]  # noqa: E731
    members = [member_from_params(take(params, k), take(state or [], k), axis_name, dtype) for k in range(n_members)]
    return _stack([m for m, _ in members]), _stack([s for _, s in members])


def to_ensemble_layout(models: MLP, eqx_state: eqx.nn.State) -> tuple[list[dict], list[dict]]:
    """Stacked ``(MLP, State)`` (or a gradient shaped like the MLP, with ``eqx_state=None``) -> our
    stacked layout; the state as the statistics Equinox's eval mode uses (``h``, the counter being
    :data:`~jaxside.equinox_model.DEBIAS_OFF_COUNTER`)."""
    params = []
    for i, linear in enumerate(models.linears):
        layer = {"weight": jnp.swapaxes(linear.weight, -1, -2)}
        if i < len(models.norms):
            layer.update(gamma=models.norms[i].weight, beta=models.norms[i].bias)
        else:
            layer["bias"] = linear.bias
        params.append(layer)
    state = (
        []
        if eqx_state is None
        else [dict(zip(("mean", "var"), eqx_state.get(n.batch_state_index))) for n in models.norms]
    )
    return params, state


def ensemble_forward(models: MLP, eqx_state: eqx.nn.State, images, *, per_member: bool):
    """Every member's logits ``(M, B, 10)`` and new state: the member vmap around the batch vmap.

    ``images`` ``(B, 784)`` shared (``per_member=False``) or ``(M, B, 784)``. The state comes out of
    the batch vmap unbatched (``out_axes=None``: ``pmean`` made it batch-invariant) and out of the
    member vmap batched (``out_axes=0``): one state per member.
    """

    def one_member(model, state, member_images):
        return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name=BATCH_AXIS)(member_images, state)

    return eqx.filter_vmap(
        one_member, in_axes=(eqx.if_array(0), eqx.if_array(0), 0 if per_member else None), axis_name=MEMBER_AXIS
    )(models, eqx_state, images)


def _member_loss(model, state, images, labels):
    logits, state = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name=BATCH_AXIS)(images, state)
    picked = jax.vmap(operator.getitem)(jax.nn.log_softmax(logits, axis=-1), labels)
    return -picked.mean(), state


@eqx.filter_jit
def _loss_and_grads(models, eqx_state, images, labels, per_member: bool):
    axis = 0 if per_member else None
    (losses, new_state), grads = eqx.filter_vmap(
        eqx.filter_value_and_grad(_member_loss, has_aux=True),
        in_axes=(eqx.if_array(0), eqx.if_array(0), axis, axis),
        axis_name=MEMBER_AXIS,
    )(models, eqx_state, images, labels)
    return losses, to_ensemble_layout(grads, None)[0], to_ensemble_layout(models, new_state)[1]


def loss_and_grads(params, state, images, labels, *, pool_members: bool = False):
    """As :func:`jaxside.ensemble.loss_and_grads`, computed by the Equinox ensemble: per-member
    losses, gradients (of the sum of the losses when pooled) and Equinox's new running statistics
    (biased variance, see :mod:`jaxside.equinox_model`), in our stacked layout, as NumPy."""
    checked = ensemble_contract.check_ensemble_inputs(params, state, images, labels, pool_members=pool_members)
    models, eqx_state = from_ensemble_params(params, state, pool_members=pool_members)
    losses, grads, new_state = _loss_and_grads(
        models, eqx_state, jnp.asarray(checked.images), jnp.asarray(checked.labels), checked.per_member
    )
    to_numpy = lambda tree: jtu.tree_map(np.asarray, tree)  # noqa: E731
    return np.asarray(losses), to_numpy(grads), to_numpy(new_state)
