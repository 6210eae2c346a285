"""Optimizer: the decay set over the real NextStep tree (derived independently from the PyTorch key names),
AdamW steps against a float64 numpy AdamW (decay set, clipping, freezing, warmup), schedule closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from nextstep_jax.checkpoint.mapping import nextstep_table
from nextstep_jax.checkpoint import read_model_config
from nextstep_jax.models.nextstep import abstract_variables
from nextstep_jax.training.optimizer import (averaged_params, decay_mask, freeze_labels, make_optimizer,
                                             make_schedule, nextstep_layer_norm_paths, optim_config, path_names,
                                             schedule_config)


@pytest.fixture(scope="module")
def golden_cfg(golden_dir):
    return read_model_config(golden_dir / "model")


def _flat(tree) -> dict:
    return {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_official_decay_set_over_the_nextstep_tree(golden_cfg, scan_layers):
    cfg = golden_cfg.copy_and_resolve_references()
    cfg.scan_layers = scan_layers
    params = nn.unbox(abstract_variables(cfg))["params"]
    got = _flat(decay_mask(params, "official", nextstep_layer_norm_paths(cfg)))
    # The released trainer: no decay if the torch name contains "bias" or the tensor belongs to an
    # nn.LayerNorm (only the FM head's affine in_ln has parameters).
    expected = {e.flax_path: not ("bias" in e.torch_key or ".in_ln." in e.torch_key) for e in nextstep_table(cfg)}
    assert got == expected
    exempt = {p for p, d in got.items() if not d}
    assert sum(p[-1] == "scale" for p in exempt) == cfg.fm_head_layers  # in_ln scales only, no RMSNorm
    assert got[("embed_tokens", "embedding")] and got[("backbone", "norm", "scale")]


def test_no_1d_decay_set_matches_the_torch_rank(golden_cfg):
    params = nn.unbox(abstract_variables(golden_cfg))["params"]
    got = _flat(decay_mask(params, "no_1d"))
    assert got == {e.flax_path: len(e.torch_shape) > 1 for e in nextstep_table(golden_cfg)}


def _small_tree():
    rng = np.random.default_rng(0)
    shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "ln": {"scale": (4,), "bias": (4,)},
              "rms": {"scale": (4,)}, "embed": {"embedding": (5, 3)}, "frozen": {"kernel": (2, 2)}}
    return jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=lambda x: isinstance(x, tuple))


def _numpy_adamw(params, grads_seq, lrs, *, b1, b2, eps, wd, clip, decays, frozen):
    """torch.optim.AdamW semantics in float64 with global-norm clipping over the trained leaves."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for step, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        norm = math.sqrt(sum(np.sum(g ** 2) for k, g in grads.items() if k not in frozen))
        scale = min(1.0, clip / norm)
        for k in p:
            if k in frozen:
                continue
            g = grads[k] * scale
            if decays[k]:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** step), v2[k] / (1 - b2 ** step)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("decay_set", ["official", "no_1d"])
def test_adamw_steps_match_float64_numpy(decay_set):
    params64 = _small_tree()
    optim = optim_config()
    optim.decay_set = decay_set
    optim.freeze = ("frozen/.*",)
    optim.weight_decay = 0.3  # large enough that a wrong decay set shows
    sched = schedule_config()
    sched.peak_lr, sched.warmup_steps = 0.05, 2
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    ln_paths = {("ln",)}
    tx, schedule = make_optimizer(optim, sched, params, total_steps=10, layer_norm_paths=ln_paths)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    # Gradient scales 0.1 (norm < 1: no clipping) and 3 (clipped): both paths run.
    grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape) * s, params64) for s in (0.1, 3.0, 0.2, 5.0)]
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    flat64 = {"/".join(k): v for k, v in _flat(params64).items()}
    expected_decay = {"dense/kernel": True, "dense/bias": False, "ln/scale": False,
                      "ln/bias": False, "rms/scale": decay_set == "official", "embed/embedding": True,
                      "frozen/kernel": True}
    lrs = [0.05 * min(1.0, s / 2) for s in range(4)]  # warmup from 0 over 2 steps, then constant
    assert [float(schedule(s)) for s in range(4)] == pytest.approx(lrs, rel=1e-6)
    want = _numpy_adamw(flat64, [{"/".join(k): v for k, v in _flat(g).items()} for g in grads_seq], lrs,
                        b1=0.9, b2=0.95, eps=1e-8, wd=0.3, clip=1.0, decays=expected_decay,
                        frozen={"frozen/kernel"})
    got = {"/".join(k): np.asarray(v) for k, v in _flat(params).items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    np.testing.assert_array_equal(got["frozen/kernel"], np.float32(flat64["frozen/kernel"]))


def test_frozen_leaves_have_no_moments():
    params = jax.tree.map(jnp.asarray, _small_tree())
    optim = optim_config()
    optim.freeze = ("frozen/.*", "embed/.*")
    tx, _ = make_optimizer(optim, schedule_config(), params, total_steps=10)
    sizes = sum(x.size for x in jax.tree.leaves(tx.init(params)) if x.ndim)
    trained = sum(x.size for k, x in _flat(params).items() if k[0] not in ("frozen", "embed"))
    assert sizes == 2 * trained  # mu and nu of the trained leaves only


def test_bfloat16_first_moment():
    params = jax.tree.map(jnp.asarray, _small_tree())
    optim = optim_config()
    optim.mu_dtype = "bfloat16"
    tx, _ = make_optimizer(optim, schedule_config(), params, total_steps=10)
    dtypes = {x.dtype for x in jax.tree.leaves(tx.init(params)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}


def test_bfloat16_second_moment_is_stored_rounded_and_tracks_float32():
    """nu kept in bfloat16 between steps (updated in float32): three AdamW steps stay within bfloat16 rounding
    of the float32 optimizer (the update divides by sqrt(nu), which halves nu's relative error)."""
    params = jax.tree.map(jnp.asarray, _small_tree())
    rng = np.random.default_rng(4)
    grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
                 for _ in range(3)]

    def run(nu_dtype):
        optim = optim_config()
        optim.nu_dtype = nu_dtype
        schedule = schedule_config()
        schedule.peak_lr, schedule.warmup_steps = 0.05, 0
        tx, _ = make_optimizer(optim, schedule, params, total_steps=10)
        state, p = tx.init(params), params
        for g in grads_seq:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return state, p

    state, got = run("bfloat16")
    nus = [s.nu for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
    assert nus and {x.dtype for nu in nus for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.bfloat16)}
    _, want = run("float32")
    start, want = _flat(params), _flat(want)
    for k, a in _flat(got).items():
        moved_got, moved_want = np.asarray(a) - start[k], np.asarray(want[k]) - start[k]
        np.testing.assert_allclose(moved_got, moved_want, rtol=4e-3, atol=1e-3 * float(np.abs(moved_want).max()),
                                   err_msg="/".join(k))


def test_unknown_freeze_pattern_is_named():
    with pytest.raises(ValueError, match=r"backbone/.*match no parameter"):
        freeze_labels(_small_tree(), ["backbone/.*"])


def test_schedules_closed_form():
    cfg = schedule_config()
    cfg.peak_lr, cfg.warmup_steps = 1e-4, 5000
    constant = make_schedule(cfg, total_steps=500_000)
    for step, want in [(0, 0.0), (1, 1e-4 / 5000), (2500, 5e-5), (4999, 1e-4 * 4999 / 5000), (5000, 1e-4),
                       (250_000, 1e-4), (500_000, 1e-4)]:
        assert float(constant(step)) == pytest.approx(want, rel=1e-6, abs=1e-12)
    cfg.kind, cfg.final_lr_fraction, cfg.warmup_steps = "cosine", 0.1, 100
    cosine = make_schedule(cfg, total_steps=1100)
    for step in (0, 50, 100, 350, 600, 1099, 1100, 2000):
        progress = min(1.0, max(0.0, (step - 100) / 1000))
        after = 0.9 * 0.5 * (1 + math.cos(math.pi * progress)) + 0.1
        want = 1e-4 * (step / 100 if step < 100 else after)
        assert float(cosine(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)
    cfg.kind = "linear"
    with pytest.raises(ValueError, match="schedule.kind 'linear'"):
        make_schedule(cfg, 10)


def test_params_ema_matches_float64_recursion():
    """``optim.ema_decay``: after each update the average moves toward the new params with the warmed-up decay
    min(decay, (1+n)/(10+n)), frozen leaves included (their average stays the params); the trained params
    are the same as without it."""
    params64 = _small_tree()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    optim, sched = optim_config(), schedule_config()
    optim.freeze = ("frozen/.*",)
    sched.peak_lr, sched.warmup_steps = 0.05, 0
    plain, _ = make_optimizer(optim, sched, params, total_steps=30)
    optim.ema_decay = 0.5  # reached at update 8 of the 25: the warm-up and the fixed decay both run
    tx, _ = make_optimizer(optim, sched, params, total_steps=30)
    assert averaged_params(plain.init(params), "no average") == "no average"
    rng = np.random.default_rng(3)
    state, plain_state, plain_params = tx.init(params), plain.init(params), params
    ema64 = {"/".join(k): v for k, v in _flat(params64).items()}
    update, plain_update = jax.jit(tx.update), jax.jit(plain.update)
    for n in range(25):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        plain_updates, plain_state = plain_update(grads, plain_state, plain_params)
        plain_params = optax.apply_updates(plain_params, plain_updates)
        d = min(0.5, (1 + n) / (10 + n))
        ema64 = {k: d * e + (1 - d) * np.float64(np.asarray(_flat(params)[tuple(k.split("/"))]))
                 for k, e in ema64.items()}
    got = {"/".join(k): np.asarray(v) for k, v in _flat(averaged_params(state, None)).items()}
    for k in ema64:
        np.testing.assert_allclose(got[k], ema64[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(got["frozen/kernel"], np.float32(params64["frozen"]["kernel"]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_ema_decay_out_of_range_is_named(decay):
    optim = optim_config()
    optim.ema_decay = decay
    with pytest.raises(ValueError, match="optim.ema_decay"):
        make_optimizer(optim, schedule_config(), jax.tree.map(jnp.asarray, _small_tree()), total_steps=10)
