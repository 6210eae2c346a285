"""The train state and its shardings, derived from the models' logical axis names.

    state = init_train_state(model_cfg, optimizer, mesh, seed=0)          # created directly sharded
    abstract = abstract_train_state(model_cfg, optimizer, mesh)         # ShapeDtypeStructs with shardings

Parameters are sharded by their logical names (``sharding.shardings_of``); every optimizer-state leaf that
mirrors a parameter (AdamW's moments, also inside masked or chained states) takes that parameter's sharding,
found by the parameter's path at the end of the leaf's path; the rest (step counts) are replicated.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextstep_jax.models.nextstep import abstract_variables, init_params
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, shardings_of


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied (skipped non-finite steps included)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]; the key of a step is fold_in(rng, step), of its row i fold_in(that, i)
    skipped: jax.Array  # int32 scalar: steps whose update was skipped for a non-finite loss or gradient


def param_shardings(model_cfg, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    return shardings_of(abstract_variables(model_cfg), mesh, rules)["params"]


def follow_params(tree, params, params_shardings, mesh: Mesh):
    """Shardings for ``tree`` (e.g. an optimizer state): a leaf whose path ends with a parameter's path and
    has its shape takes that parameter's sharding; other leaves are replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                      jax.tree.leaves(params_shardings)):
        by_path[tuple(path)] = (leaf.shape, sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and tuple(match[0]) == tuple(leaf.shape):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(abstract_state: TrainState, params_shardings, mesh: Mesh) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=replicated, params=params_shardings,
                      opt_state=follow_params(abstract_state.opt_state, abstract_state.params, params_shardings,
                                              mesh),
                      rng=replicated, skipped=replicated)


def _new_state(params, optimizer: optax.GradientTransformation, seed) -> TrainState:
    # The step stream is folded off the seed, apart from the key a fresh init draws params from.
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1), skipped=jnp.int32(0))


def abstract_train_state(model_cfg, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules=LOGICAL_AXIS_RULES) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct``s carrying their shardings: nothing is allocated (the plan
    compiles the 14B step from it; checkpoint restore targets it)."""
    params = nn.unbox(abstract_variables(model_cfg))["params"]
    shapes = jax.eval_shape(lambda p: _new_state(p, optimizer, 0), params)
    shardings = state_shardings(shapes, param_shardings(model_cfg, mesh, rules), mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(model_cfg, optimizer: optax.GradientTransformation, mesh: Mesh, *, seed: int = 0,
                     params=None, rules=LOGICAL_AXIS_RULES) -> TrainState:
    """A fresh state created directly sharded: params from ``seed`` (or the given ``params``, e.g. loaded
    from a checkpoint, resharded if needed), zero optimizer state, step 0."""
    abstract = abstract_train_state(model_cfg, optimizer, mesh, rules)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    if params is None:
        make = lambda: _new_state(init_params(model_cfg, jax.random.PRNGKey(seed)), optimizer, seed)
        return jax.jit(make, out_shardings=shardings)()
    params = jax.device_put(params, shardings.params)
    return jax.jit(lambda p: _new_state(p, optimizer, seed), out_shardings=shardings)(params)
