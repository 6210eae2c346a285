"""Flow-matching head: network, loss and samplers against the golden vectors and float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from numerics import assert_close_rel

from nextstep_jax.models.fm_head import (
    SimpleMLPAdaLN,
    cfg_combine,
    draw_noise,
    flow_matching_loss,
    num_noise_draws,
    sample,
    sample_head,
    timestep_embedding,
    timesteps,
)
from nextstep_jax.models.nextstep import token_dim
from nextstep_jax.sharding import LOGICAL_AXIS_RULES

F32_REL = 1e-4  # golden README: net/loss atol=rtol=1e-4, sampler 1e-4·max|ref|
# bf16 compute: unit roundoff 2^-8 ≈ 3.9e-3; observed ≤ 1e-2·max|ref| on net, loss and sampler outputs
# (a few roundoffs accumulated through the layers and steps), so 3e-2 leaves a ~3x margin.
BF16_REL = 3e-2
DTYPES = [("float32", F32_REL), ("bfloat16", BF16_REL)]


@pytest.fixture(scope="module")
def head(golden_model):
    """(module kwargs, variables) of the golden release's image_head, through the shared loader."""
    cfg, variables = golden_model()
    kwargs = dict(token_dim=token_dim(cfg), dim=cfg.fm_head_dim, num_layers=cfg.fm_head_layers,
                  mlp_ratio=cfg.fm_head_mlp_ratio)
    return kwargs, {"params": variables["params"]["image_head"]}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _rel(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


# --- network ------------------------------------------------------------------------------------------------
def test_param_tree_mirrors_checkpoint_and_has_logical_axes(head, load_case):
    kwargs, params = head
    d = load_case("d_fm_net")
    module = SimpleMLPAdaLN(**kwargs)
    boxed = jax.eval_shape(module.init, jax.random.key(0), d["x"], d["t"], d["c"])
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
    assert shapes == jax.tree.map(lambda a: a.shape, params)
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(jax.tree.leaves(params))
    for spec in specs:
        assert spec and all(name in known for name in spec), spec


def test_init_follows_official_scheme():
    dim, cond_dim = 32, 48
    module = SimpleMLPAdaLN(token_dim=16, dim=dim, num_layers=2)
    x, t, c = jnp.ones((4, 16)), jnp.full((4,), 0.3), jnp.ones((4, cond_dim))
    p = nn.unbox(module.init(jax.random.key(1), x, t, c))["params"]
    zero = [p["final_layer"]["linear"], p["final_layer"]["adaLN_modulation_1"]]
    zero += [p[f"res_blocks_{j}"]["adaLN_modulation_1"] for j in range(2)]
    for leaf in jax.tree.leaves(zero):
        assert not np.any(leaf)
    for name in ("mlp_0", "mlp_2"):
        assert abs(float(jnp.std(p["time_embed"][name]["kernel"])) - 0.02) < 0.004
    for kernel in (p["cond_embed"]["kernel"], p["input_proj"]["kernel"], p["res_blocks_0"]["mlp_0"]["kernel"]):
        bound = math.sqrt(6 / sum(kernel.shape))
        assert float(jnp.max(jnp.abs(kernel))) <= bound
        assert abs(float(jnp.std(kernel)) / (bound / math.sqrt(3)) - 1) < 0.15
    np.testing.assert_array_equal(p["res_blocks_1"]["in_ln"]["scale"], np.ones(dim))
    assert not np.any(module.apply({"params": p}, x, t, c))  # zero-initialised output, as released


def test_timestep_embedding_golden_and_float64(load_case):
    d = load_case("d_fm_net")
    dim = d["t_freq"].shape[1]
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(d["t"]), dim), d["t_freq"], atol=1e-4, rtol=1e-4)
    t = np.concatenate([d["t"], np.random.default_rng(0).uniform(0, 1, 16)]).astype(np.float32)
    for n in (dim, 7):
        half = n // 2
        args = t.astype(np.float64)[:, None] * np.exp(-math.log(1e4) * np.arange(half) / half)[None]
        ref = np.concatenate([np.cos(args), np.sin(args), np.zeros((len(t), n % 2))], axis=1)
        np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), n), ref, atol=1e-6)


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_net_matches_golden(head, load_case, dtype, rel):
    kwargs, params = head
    d = load_case("d_fm_net")
    module = SimpleMLPAdaLN(**kwargs, dtype=dtype)
    v = module.apply(params, d["x"], d["t"], d["c"])
    assert v.dtype == jnp.dtype(dtype)
    assert_close_rel(v, d["velocity"], rel, "velocity")
    t_emb = module.apply(params, jnp.asarray(d["t"]), method=lambda m, t: m.time_embed(t))
    assert_close_rel(t_emb, d["t_emb"], rel, "t_emb")
    c_emb = module.apply(params, d["c"], method=module.embed_condition)
    split = module.apply(params, d["x"], d["t"], c_emb, method=module.velocity)
    np.testing.assert_array_equal(np.asarray(split, np.float32), np.asarray(v, np.float32))


# --- loss ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_loss_matches_golden(head, load_case, dtype, rel):
    kwargs, params = head
    e = load_case("e_fm_loss")
    module = SimpleMLPAdaLN(**kwargs, dtype=dtype)
    net_fn = lambda x, t, c: module.apply(params, x, t, c)  # noqa: E731
    for sub, mask in (("masked", e["mask"]), ("nomask", None)):
        loss = flow_matching_loss(net_fn, e["target"], e["c"], mask, noise=e[f"{sub}_noise"], u=e[f"{sub}_u"])
        assert loss.dtype == jnp.float32 and loss.shape == ()
        assert_close_rel(loss, e[f"{sub}_loss"], rel, sub)


def _linear_field(rng, dim, cond_dim):
    a = rng.normal(0, 0.3, (dim, dim)).astype(np.float32)
    b = rng.normal(0, 1, dim).astype(np.float32)
    w = rng.normal(0, 0.3, (cond_dim, dim)).astype(np.float32)
    jax_fn = lambda x, t, c: x @ a + t[:, None] * b + c @ w  # noqa: E731
    np_fn = lambda x, t, c: x @ a.astype(np.float64) + t[:, None] * b + c @ w.astype(np.float64)  # noqa: E731
    return jax_fn, np_fn


def test_loss_tiling_mask_and_gradients_against_numpy():
    rng = np.random.default_rng(0)
    n, dim, mul = 5, 8, 3
    net, net64 = _linear_field(rng, dim, 6)
    target = rng.normal(size=(n, dim)).astype(np.float32)
    c = rng.normal(size=(n, 6)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0], np.float32)
    noise = rng.normal(size=(n * mul, dim)).astype(np.float32)
    u = rng.normal(size=n * mul).astype(np.float32)

    x1, c64, m64 = np.tile(target, (mul, 1)), np.tile(c, (mul, 1)), np.tile(mask, mul)  # whole-block tiling
    t = 1 / (1 + np.exp(-u.astype(np.float64)))
    xt = t[:, None] * x1 + (1 - t[:, None]) * noise
    rows = np.mean((net64(xt, t, c64) - (x1 - noise)) ** 2, axis=1)
    for m, ref in ((mask, np.sum(rows * m64) / (np.sum(m64) + 1e-8)), (None, np.mean(rows))):
        got = flow_matching_loss(net, target, c, m, batch_mul=mul, noise=noise, u=u)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)

    grad_fn = jax.jit(jax.grad(lambda tg, cc, mk, key: flow_matching_loss(net, tg, cc, mk, batch_mul=mul, key=key),
                               argnums=(0, 1)))
    g_target, g_c = grad_fn(target, c, mask, jax.random.key(0))
    assert not np.any(g_target)  # target is stop-gradient
    assert np.all(np.any(g_c[mask == 1] != 0, axis=1)) and not np.any(g_c[mask == 0])


# --- sampler: golden ----------------------------------------------------------------------------------------
def _golden_subcases(f):
    return sorted({k[: -len("_params")] for k in f if k.endswith("_params")})


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_sampler_matches_golden(head, load_case, dtype, rel):
    kwargs, params = head
    f = load_case("f_fm_sample")
    module = SimpleMLPAdaLN(**kwargs, dtype=dtype)
    subcases = _golden_subcases(f)
    assert subcases
    for s in subcases:
        cfg, cfg2, shift, steps, repeat, cfg_mult = (float(v) for v in f[f"{s}_params"])
        assert f[f"{s}_draws"].shape[0] == num_noise_draws(int(steps))
        run = jax.jit(lambda p, c, n: sample_head(module, p, c, cfg_mult=int(cfg_mult), cfg=cfg, cfg_img=cfg2,
                                                  num_steps=int(steps), timesteps_shift=shift,
                                                  noise_repeat=int(repeat), noises=n))
        out = run(params, f[f"{s}_c"], f[f"{s}_draws"])
        assert out.dtype == jnp.float32
        assert_close_rel(out, f[f"{s}_out"], rel, f"{s} ({dtype})")


def test_sample_head_equals_plain_forward_sampling(head, load_case):
    kwargs, params = head
    f = load_case("f_fm_sample")
    s = _golden_subcases(f)[-1]
    cfg, cfg2, shift, steps, repeat, cfg_mult = (float(v) for v in f[f"{s}_params"])
    module = SimpleMLPAdaLN(**kwargs)
    kw = dict(cfg_mult=int(cfg_mult), cfg=cfg, cfg_img=cfg2, num_steps=int(steps), timesteps_shift=shift,
              noise_repeat=int(repeat), noises=f[f"{s}_draws"])
    fast = sample_head(module, params, jnp.asarray(f[f"{s}_c"]), **kw)
    plain = sample(lambda x, t, c: module.apply(params, x, t, c), jnp.asarray(f[f"{s}_c"]), **kw)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)


# --- sampler: independent references ------------------------------------------------------------------------
def _grid64(n, shift, delta, grid):
    if grid == "nextstep1":
        tau = np.linspace(0, 1 - delta, n)
        return tau / (shift - (shift - 1) * tau)
    tau = np.linspace(0, 1, n + 1)[:-1]
    return np.append(tau / (shift - (shift - 1) * tau), 1.0)


def _cfg64(v, cfg_mult, cfg, cfg_img):
    if cfg_mult == 1:
        return v
    if cfg_mult == 2:
        cond, unc = np.split(v, 2)
        return unc + cfg * (cond - unc)
    cond, unc1, unc2 = np.split(v, 3)
    return unc2 + cfg_img * (unc1 - unc2) + cfg * (cond - unc1)


@pytest.mark.parametrize("grid", ["nextstep1", "nextstep1.1"])
@pytest.mark.parametrize("cfg_mult", [1, 2, 3])
def test_sde_sampler_against_float64_numpy(grid, cfg_mult):
    rng = np.random.default_rng(cfg_mult)
    b, dim, steps, shift, delta, cfg, cfg_img = 4, 8, 6, 3.2, 0.04, 2.5, 1.5
    net, net64 = _linear_field(rng, dim, 5)
    c = rng.normal(size=(b * cfg_mult, 5)).astype(np.float32)
    noises = rng.normal(size=(num_noise_draws(steps, grid), b, dim)).astype(np.float32)
    got = sample(net, jnp.asarray(c), cfg_mult=cfg_mult, cfg=cfg, cfg_img=cfg_img, num_steps=steps,
                 timesteps_shift=shift, last_step_size=delta, grid=grid, noises=noises, token_dim=dim)

    ts = _grid64(steps, shift, delta, grid)
    x = noises[0].astype(np.float64)
    v_of = lambda x, t: _cfg64(net64(np.tile(x, (cfg_mult, 1)), np.full(len(c), t), c), cfg_mult, cfg, cfg_img)  # noqa: E731
    for i in range(len(ts) - 1):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v = v_of(x, t)
        drift = v + (1 - t) * (t * v - x) / (1 - t)
        x = x + drift * dt + np.sqrt(2 * (1 - t) * dt) * noises[i + 1]
    if grid == "nextstep1":
        x = x + delta * v_of(x, ts[-1])
    assert_close_rel(got, x, 1e-5, f"sde {grid} cfg_mult={cfg_mult}")


@pytest.mark.parametrize("grid", ["nextstep1", "nextstep1.1"])
def test_ode_sampler_closed_form(grid):
    # v = λ·x: Euler on a uniform grid multiplies x by (1 + λ·dt) per step.
    steps, delta = 7, 0.04
    rng = np.random.default_rng(3)
    lam = rng.uniform(-1, 1, (3, 8)).astype(np.float32)
    x0 = rng.normal(size=(1, 3, 8)).astype(np.float32)
    got = sample(lambda x, t, c: c * x, jnp.asarray(lam), cfg_mult=1, num_steps=steps, grid=grid, method="ode",
                 last_step_size=delta, noises=x0, token_dim=8)
    lam64 = lam.astype(np.float64)
    if grid == "nextstep1":
        ref = x0[0] * (1 + lam64 * (1 - delta) / (steps - 1)) ** (steps - 1) * (1 + lam64 * delta)
    else:
        ref = x0[0] * (1 + lam64 / steps) ** steps
    assert_close_rel(got, ref, 1e-5, f"ode {grid}")


def test_timestep_grids():
    ts = timesteps(50, 3.2)  # REFERENCE §5.3 numerical check
    np.testing.assert_allclose(ts[[1, 2, -2, -1]], [0.00621, 0.01258, 0.8314, 0.8824], atol=1e-4)
    assert abs(ts[-1] + 0.04 - 0.922) < 1e-3
    assert timesteps(50)[-1] == np.float32(0.96) and ts.dtype == np.float32
    for n, shift in ((10, 2.0), (7, 1.0), (50, 3.2)):
        for grid in ("nextstep1", "nextstep1.1"):
            np.testing.assert_allclose(timesteps(n, shift, grid=grid), _grid64(n, shift, 0.04, grid), atol=1e-6)
        g11 = timesteps(n, shift, grid="nextstep1.1")
        assert len(g11) == n + 1 and g11[0] == 0 and g11[-1] == 1 and np.all(np.diff(g11) > 0)
    assert num_noise_draws(8) == 8 and num_noise_draws(8, "nextstep1.1") == 9 and num_noise_draws(8, method="ode") == 1


def test_noise_repeat_tiling_with_key():
    key = jax.random.key(7)
    noise = np.asarray(draw_noise(key, 3, 6, 8, noise_repeat=3))
    np.testing.assert_array_equal(noise[:, 3:], noise[:, :3])  # [r0 r1 r2 r0 r1 r2]
    assert len({noise[0, i].tobytes() for i in range(3)}) == 3 and not np.array_equal(noise[0], noise[1])
    kw = dict(cfg_mult=2, cfg=3.0, num_steps=4, noise_repeat=3, token_dim=8)
    zero_v = lambda x, t, c: jnp.zeros_like(x, jnp.float32)  # noqa: E731
    out = np.asarray(sample(zero_v, jnp.zeros((12, 1)), key=key, **kw))
    np.testing.assert_array_equal(out[3:], out[:3])
    replay = sample(zero_v, jnp.zeros((12, 1)), noises=draw_noise(key, num_noise_draws(4), 6, 8, 3), **kw)
    np.testing.assert_array_equal(out, replay)


@pytest.mark.parametrize("cfg_mult", [1, 2, 3])
def test_cfg_combine_against_numpy(cfg_mult):
    v = np.random.default_rng(cfg_mult).normal(size=(4 * cfg_mult, 8)).astype(np.float32)
    got = cfg_combine(jnp.asarray(v), cfg_mult, jnp.float32(4.0), jnp.float32(1.7))
    np.testing.assert_allclose(got, _cfg64(v.astype(np.float64), cfg_mult, 4.0, 1.7), rtol=1e-5, atol=1e-5)


def test_sampler_jits_with_traced_cfg_scalars():
    rng = np.random.default_rng(0)
    net, _ = _linear_field(rng, 8, 5)
    c = jnp.asarray(rng.normal(size=(9, 5)).astype(np.float32))
    traces = []

    @jax.jit
    def run(cfg, cfg_img, key):
        traces.append(1)
        return sample(net, c, cfg_mult=3, cfg=cfg, cfg_img=cfg_img, num_steps=5, timesteps_shift=2.0, key=key,
                      token_dim=8)

    key = jax.random.key(1)
    for cfg, cfg_img in ((2.0, 1.5), (4.0, 3.0)):
        eager = sample(net, c, cfg_mult=3, cfg=cfg, cfg_img=cfg_img, num_steps=5, timesteps_shift=2.0, key=key,
                       token_dim=8)
        np.testing.assert_allclose(run(jnp.float32(cfg), jnp.float32(cfg_img), key), eager, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


def test_bf16_compute_rounds_network_inputs_only():
    seen = []

    def v_is_t(x, t, c):  # v = t: the ODE sums the bf16-rounded grid times
        seen.append((x.dtype, t.dtype))
        return jnp.broadcast_to(t[:, None], x.shape)

    steps, shift = 6, 3.2
    x0 = np.zeros((1, 2, 4), np.float32)
    out = sample(v_is_t, jnp.zeros((2, 1)), cfg_mult=1, num_steps=steps, timesteps_shift=shift, method="ode",
                 noises=x0, compute_dtype=jnp.bfloat16, token_dim=4)
    assert out.dtype == jnp.float32 and set(seen) == {(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))}
    ts = timesteps(steps, shift).astype(np.float64)
    t16 = np.asarray(jnp.asarray(timesteps(steps, shift)).astype(jnp.bfloat16), np.float64)
    ref = np.sum(t16[:-1] * np.diff(ts)) + t16[-1] * 0.04
    assert not np.isclose(ref, np.sum(ts[:-1] * np.diff(ts)) + ts[-1] * 0.04, rtol=1e-6, atol=0)
    np.testing.assert_allclose(out, np.full((2, 4), ref), rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    v = lambda x, t, c: x  # noqa: E731
    kw = dict(num_steps=3, key=jax.random.key(0), token_dim=4)
    with pytest.raises(ValueError, match="divisible by noise_repeat"):
        sample(v, jnp.zeros((6, 1)), cfg_mult=2, noise_repeat=2, **kw)
    with pytest.raises(ValueError, match="not divisible by cfg_mult"):
        sample(v, jnp.zeros((7, 1)), cfg_mult=2, **kw)
    with pytest.raises(ValueError, match="cfg_mult must be 1, 2 or 3"):
        sample(v, jnp.zeros((8, 1)), cfg_mult=4, **kw)
    with pytest.raises(ValueError, match="unknown grid"):
        sample(v, jnp.zeros((2, 1)), cfg_mult=1, grid="flux", **kw)
    with pytest.raises(ValueError, match="unknown method"):
        sample(v, jnp.zeros((2, 1)), cfg_mult=1, method="dpm", **kw)
    with pytest.raises(ValueError, match="noises must have shape"):
        sample(v, jnp.zeros((2, 1)), cfg_mult=1, num_steps=3, noises=jnp.zeros((2, 2, 4)), token_dim=4)
    with pytest.raises(ValueError, match="needs `key`"):
        flow_matching_loss(v, jnp.zeros((2, 4)), jnp.zeros((2, 1)), noise=jnp.zeros((2, 4)))
