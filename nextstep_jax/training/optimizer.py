"""AdamW with the released trainer's settings, its weight-decay set, learning-rate schedules and freeze masks.

    tx, schedule = make_optimizer(config.optim, config.schedule, params, total_steps=config.total_steps,
                                  layer_norm_paths=nextstep_layer_norm_paths(config.model))

The official trainer (torch AdamW, betas 0.9/0.95, eps 1e-8, weight decay 0.1, global-norm clipping 1.0) decays
every trainable parameter except those inside an ``nn.LayerNorm`` module and those whose name contains "bias".
So RMSNorm scales, token embeddings, ``lm_head`` and the adaLN kernels ARE decayed; only biases and the flow-
matching head's affine LayerNorms are not. ``decay_set="no_1d"`` is the common alternative: no decay on any
bias or norm scale (the parameters that are 1-D in the PyTorch layout; ours can have more axes, e.g. per-head
biases [heads, head_dim] or the stacked [layers, ...] axis of scanned layers).

Frozen parameters (``optim.freeze``: regular expressions over "/"-joined parameter paths) get zero updates and
no optimizer moments; the clipping norm is taken over the trained parameters only, as the official trainer,
which leaves frozen parameters out of its optimizer.

``optim.ema_decay`` > 0 adds a moving average of the params to the optimizer state (``params_ema``): sharded,
checkpointed and kept on a skipped step like the moments, and what the trainer samples and exports
(``averaged_params``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

DECAY_SETS = ("official", "no_1d")
SCHEDULE_KINDS = ("warmup_constant", "cosine")
TRAIN, FROZEN = "train", "frozen"

Path = tuple[str, ...]


def optim_config() -> ml_collections.ConfigDict:
    """Defaults of ``config.optim`` = the official trainer's AdamW."""
    return ml_collections.ConfigDict(dict(
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        decay_set="official",  # official | no_1d
        clip_norm=1.0,  # global L2 norm of the trained gradients; 0 disables clipping
        mu_dtype="float32",  # first moment dtype ("bfloat16" halves its memory)
        nu_dtype="float32",  # second moment storage dtype ("bfloat16": stored rounded, updated in float32)
        # Regexes matched against the whole "/"-joined param path, e.g. "backbone/.*" (the official
        # freeze_lm_model: layers + final norm), "embed_tokens/.*", "lm_head/.*".
        freeze=(),
        # > 0: also keep an exponential moving average of the params (in the optimizer state), which the
        # periodic samples and the export then use; 0: none (the official trainer keeps none).
        ema_decay=0.0,
    ))


def schedule_config() -> ml_collections.ConfigDict:
    """Defaults of ``config.schedule`` = the official 256 px stage.

    The official configs ask for "cosine" with ``scale_lr=1.0``, whose factor after warmup is
    ``(1 - scale_lr)·½(1 + cos(π·progress)) + scale_lr`` = 1: linear warmup from 0, then a constant rate, no
    decay at all. ``warmup_constant`` is that schedule; ``cosine`` is a real cosine decay from the peak to
    ``final_lr_fraction``·peak at ``total_steps`` (the official formula with ``scale_lr=final_lr_fraction``).
    """
    return ml_collections.ConfigDict(dict(
        kind="warmup_constant",  # warmup_constant | cosine
        peak_lr=1e-4,
        warmup_steps=5000,
        final_lr_fraction=0.0,  # cosine only
    ))


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """LR for the update at step ``count`` (0-based): ``peak·count/warmup`` during warmup (so the first update
    has LR 0, as the official scheduler), then constant or cosine."""
    if cfg.kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule.kind {cfg.kind!r} is not one of {SCHEDULE_KINDS}")
    if cfg.warmup_steps < 0 or cfg.peak_lr < 0:
        raise ValueError(f"schedule.warmup_steps ({cfg.warmup_steps}) and schedule.peak_lr ({cfg.peak_lr}) "
                         "must be >= 0")
    peak, warmup = float(cfg.peak_lr), int(cfg.warmup_steps)
    final = float(cfg.final_lr_fraction)
    decay_steps = max(1, int(total_steps) - warmup)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = count / max(1, warmup)
        if cfg.kind == "warmup_constant":
            after = 1.0
        else:
            progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
            after = (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress)) + final
        return peak * jnp.where(count < warmup, ramp, after)

    return schedule


def path_names(path) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_norm_paths(module: nn.Module, *init_args, method=None) -> frozenset[Path]:
    """Paths of every ``nn.LayerNorm`` submodule, found by tracing ``module.init`` abstractly (nothing is
    allocated): the official decay set is defined by module type, not by parameter name."""
    found = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.LayerNorm):
            found.add(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda key: module.init(key, *init_args, method=method), jax.random.key(0))
    return frozenset(found)


def nextstep_layer_norm_paths(model_cfg) -> frozenset[Path]:
    from nextstep_jax.models.nextstep import NextStep, token_dim

    inputs = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, token_dim(model_cfg)), jnp.float32)
    return layer_norm_paths(NextStep(model_cfg), *inputs, method=NextStep.touch_all)


def decay_mask(params, decay_set: str, layer_norm_paths: Collection[Path] = ()):
    """A bool tree like ``params``: True where weight decay applies."""
    if decay_set not in DECAY_SETS:
        raise ValueError(f"optim.decay_set {decay_set!r} is not one of {DECAY_SETS}")
    ln = frozenset(tuple(p) for p in layer_norm_paths)

    def decays(path, leaf) -> bool:
        names = path_names(path)
        if "bias" in names[-1]:
            return False
        if decay_set == "official":
            return names[:-1] not in ln
        return names[-1] != "scale" and leaf.ndim > 1

    return jax.tree_util.tree_map_with_path(decays, params)


def freeze_labels(params, patterns: Collection[str]):
    """``"frozen"`` for every leaf whose "/"-joined path fully matches one of ``patterns``, else ``"train"``.
    A pattern that matches nothing is an error (a typo would otherwise silently train everything)."""
    compiled = [re.compile(p) for p in patterns]
    used = set()

    def label(path, _):
        name = "/".join(path_names(path))
        hits = [p.pattern for p in compiled if p.fullmatch(name)]
        used.update(hits)
        return FROZEN if hits else TRAIN

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [p.pattern for p in compiled if p.pattern not in used]
    if unused:
        raise ValueError(f"optim.freeze patterns {unused} match no parameter path (paths look like "
                         "'backbone/layers/mlp/up_proj/kernel')")
    return labels


def make_optimizer(optim: ml_collections.ConfigDict, schedule_cfg: ml_collections.ConfigDict, params, *,
                   total_steps: int, layer_norm_paths: Collection[Path] = ()
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, schedule). ``params`` may be abstract (shapes only); it fixes the tree the
    decay mask and freeze labels are computed for."""
    schedule = make_schedule(schedule_cfg, total_steps)
    mask = decay_mask(params, optim.decay_set, layer_norm_paths)
    labels = freeze_labels(params, tuple(optim.freeze))
    trained_mask = jax.tree.map(lambda keep, lab: keep and lab == TRAIN, mask, labels)
    if optim.clip_norm < 0:
        raise ValueError(f"optim.clip_norm must be >= 0, got {optim.clip_norm}")
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mu_dtype=jnp.dtype(optim.mu_dtype),
                        # multi_transform hands the trained subtree (frozen leaves masked out) to this callable.
                        mask=lambda trained: _subtree_like(trained, trained_mask))
    if jnp.dtype(optim.nu_dtype) != jnp.float32:
        adamw = _second_moment_stored_as(adamw, jnp.dtype(optim.nu_dtype))
    train = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm else adamw
    tx = optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels)
    ema_decay = float(optim.ema_decay)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay must be in [0, 1), got {ema_decay}")
    return (optax.chain(tx, params_ema(ema_decay)) if ema_decay else tx), schedule


class ParamsEma(NamedTuple):
    count: jax.Array  # int32 scalar: updates averaged in
    ema: Any  # like params, float32


def params_ema(decay: float) -> optax.GradientTransformation:
    """Keeps ``ema ← d·ema + (1 - d)·params`` of the params after each update, with d = min(decay, (1 + n) /
    (10 + n)) at update n, so that a short run's average is not dominated by its initial params. The updates
    pass through unchanged; ``averaged_params`` finds the average in an optimizer state."""

    def init(params):
        ema = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return ParamsEma(count=jnp.zeros([], jnp.int32), ema=ema)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params_ema needs the params: call update(updates, state, params)")
        n = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        new_params = optax.apply_updates(params, updates)
        # e + (1 - d)(p - e): a leaf that did not move (frozen) keeps its average bit for bit.
        ema = jax.tree.map(lambda e, p: e + (1.0 - d) * (p.astype(jnp.float32) - e), state.ema, new_params)
        return updates, ParamsEma(count=state.count + 1, ema=ema)

    return optax.GradientTransformation(init, update)


def averaged_params(opt_state, params):
    """The params to sample, evaluate and export: the moving average an ``optim.ema_decay`` run keeps in
    ``opt_state``, else ``params`` themselves."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEma))
             if isinstance(s, ParamsEma)]
    return found[0].ema if found else params


def _second_moment_stored_as(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``tx`` with every Adam second moment kept in ``dtype`` between steps and updated in float32 (optax casts
    only the first moment)."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)

    def cast(state, to):
        return jax.tree.map(lambda s: s._replace(nu=jax.tree.map(lambda n: n.astype(to), s.nu)) if is_adam(s) else s,
                            state, is_leaf=is_adam)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(tx.init(params), dtype), update)


def _subtree_like(masked_params, full_mask):
    """``full_mask`` restricted to the leaves present in ``masked_params`` (the others are ``MaskedNode``)."""
    return jax.tree.map(lambda p, m: m if not isinstance(p, optax.MaskedNode) else p, masked_params, full_mask,
                        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
