"""Flow-matching samplers: the golden sampler vectors, float64 numpy references and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_rel, linear_field

from nextstep_jax.models.fm_head import SimpleMLPAdaLN, head_module
from nextstep_jax.models.fm_sampler import (
    combine_guidance,
    draw_noise,
    guidance_at,
    num_noise_draws,
    sample,
    sample_head,
    timesteps,
)

# Golden README: sampler outputs within 1e-4·max|ref|. bf16 compute: observed <= 1e-2·max|ref| (a few bf16
# roundoffs accumulated over the steps), so 3e-2 leaves a ~3x margin, as for the network in test_fm_head.py.
DTYPES = [("float32", 1e-4), ("bfloat16", 3e-2)]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


# --- sampler: golden ----------------------------------------------------------------------------------------
def _golden_subcases(f):
    return sorted({k[: -len("_params")] for k in f if k.endswith("_params")})


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_sampler_matches_golden(golden_head, load_case, dtype, rel):
    kwargs, params = golden_head
    f = load_case("f_fm_sample")
    module = SimpleMLPAdaLN(**kwargs, dtype=dtype)
    subcases = _golden_subcases(f)
    assert subcases
    for s in subcases:
        scale, image_scale, shift, steps, repeat, cfg_mult = (float(v) for v in f[f"{s}_params"])
        assert f[f"{s}_draws"].shape[0] == num_noise_draws(int(steps))
        run = jax.jit(lambda p, c, n: sample_head(module, p, c, cfg_mult=int(cfg_mult), guidance_scale=scale,
                                                  image_guidance_scale=image_scale, num_steps=int(steps),
                                                  timesteps_shift=shift, noise_repeat=int(repeat), noises=n))
        out = run(params, f[f"{s}_c"], f[f"{s}_draws"])
        assert out.dtype == jnp.float32
        assert_close_rel(out, f[f"{s}_out"], rel, f"{s} ({dtype})")


def test_sample_head_equals_plain_forward_sampling(golden_head, load_case):
    kwargs, params = golden_head
    f = load_case("f_fm_sample")
    s = _golden_subcases(f)[-1]
    scale, image_scale, shift, steps, repeat, cfg_mult = (float(v) for v in f[f"{s}_params"])
    module = SimpleMLPAdaLN(**kwargs)
    kw = dict(cfg_mult=int(cfg_mult), guidance_scale=scale, image_guidance_scale=image_scale, num_steps=int(steps),
              timesteps_shift=shift, noise_repeat=int(repeat), noises=f[f"{s}_draws"])
    fast = sample_head(module, params, jnp.asarray(f[f"{s}_c"]), **kw)
    plain = sample(lambda x, t, c: module.apply(params, x, t, c), jnp.asarray(f[f"{s}_c"]), **kw)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)


# --- sampler: independent references ------------------------------------------------------------------------
def _grid64(n, shift, delta, grid):
    """The official grids in float64. NextStep-1: ``FlowMatchingHead.sample`` (stepfun-ai/NextStep-1,
    nextstep/models/modeling_fm_head.py): N points linspace(0, 1 - δ, N), each shifted t / (s - (s - 1)·t), then
    a final δ step. NextStep-1.1: the sampler of the release's own model code (heads.py of the
    stepfun-ai/NextStep-1.1 checkpoint): linspace(0, 1, N + 1) without its last point, shifted, then 1."""
    if grid == "nextstep1":
        tau = np.linspace(0, 1 - delta, n)
        return tau / (shift - (shift - 1) * tau)
    tau = np.linspace(0, 1, n + 1)[:-1]
    return np.append(tau / (shift - (shift - 1) * tau), 1.0)


def _guided64(v, cfg_mult, scale, image_scale):
    if cfg_mult == 1:
        return v
    if cfg_mult == 2:
        cond, unc = np.split(v, 2)
        return unc + scale * (cond - unc)
    cond, unc1, unc2 = np.split(v, 3)
    return unc2 + image_scale * (unc1 - unc2) + scale * (cond - unc1)


@pytest.mark.parametrize("grid", ["nextstep1", "nextstep1.1"])
@pytest.mark.parametrize("cfg_mult", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 6])  # 1: the "nextstep1" grid is the single point 0, then the δ step
def test_sde_sampler_against_float64_numpy(grid, cfg_mult, steps):
    rng = np.random.default_rng(cfg_mult)
    b, dim, shift, delta, scale, image_scale = 4, 8, 3.2, 0.04, 2.5, 1.5
    net, net64 = linear_field(rng, dim, 5)
    c = rng.normal(size=(b * cfg_mult, 5)).astype(np.float32)
    noises = rng.normal(size=(num_noise_draws(steps, grid), b, dim)).astype(np.float32)
    got = sample(net, jnp.asarray(c), cfg_mult=cfg_mult, guidance_scale=scale, image_guidance_scale=image_scale,
                 num_steps=steps, timesteps_shift=shift, last_step_size=delta, grid=grid, noises=noises, token_dim=dim)

    def v_of(x, t):
        return _guided64(net64(np.tile(x, (cfg_mult, 1)), np.full(len(c), t), c), cfg_mult, scale, image_scale)

    ts = _grid64(steps, shift, delta, grid)
    x = noises[0].astype(np.float64)
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
    ts = timesteps(50, 3.2)  # the shifted grid worked out by hand: with shift 3.2 it stops short of 1
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
    kw = dict(cfg_mult=2, guidance_scale=3.0, num_steps=4, noise_repeat=3, token_dim=8)
    zero_v = lambda x, t, c: jnp.zeros_like(x, jnp.float32)  # noqa: E731
    out = np.asarray(sample(zero_v, jnp.zeros((12, 1)), key=key, **kw))
    np.testing.assert_array_equal(out[3:], out[:3])
    replay = sample(zero_v, jnp.zeros((12, 1)), noises=draw_noise(key, num_noise_draws(4), 6, 8, 3), **kw)
    np.testing.assert_array_equal(out, replay)


@pytest.mark.parametrize("cfg_mult", [1, 2, 3])
def test_combine_guidance_against_numpy(cfg_mult):
    v = np.random.default_rng(cfg_mult).normal(size=(4 * cfg_mult, 8)).astype(np.float32)
    got = combine_guidance(jnp.asarray(v), cfg_mult, jnp.float32(4.0), jnp.float32(1.7))
    np.testing.assert_allclose(got, _guided64(v.astype(np.float64), cfg_mult, 4.0, 1.7), rtol=1e-5, atol=1e-5)


def test_sampler_jits_with_traced_guidance_scales():
    rng = np.random.default_rng(0)
    net, _ = linear_field(rng, 8, 5)
    c = jnp.asarray(rng.normal(size=(9, 5)).astype(np.float32))
    traces = []

    @jax.jit
    def run(scale, image_scale, key):
        traces.append(1)
        return sample(net, c, cfg_mult=3, guidance_scale=scale, image_guidance_scale=image_scale, num_steps=5,
                      timesteps_shift=2.0, key=key, token_dim=8)

    key = jax.random.key(1)
    for scale, image_scale in ((2.0, 1.5), (4.0, 3.0)):
        eager = sample(net, c, cfg_mult=3, guidance_scale=scale, image_guidance_scale=image_scale, num_steps=5,
                       timesteps_shift=2.0, key=key, token_dim=8)
        np.testing.assert_allclose(run(jnp.float32(scale), jnp.float32(image_scale), key), eager, rtol=1e-5, atol=1e-5)
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grid,method", [("nextstep1", "sde"), ("nextstep1", "ode"), ("nextstep1.1", "sde")])
def test_precomputed_modulations_match_plain_sampling(golden_model, dtype, grid, method):
    """Sampling with precomputed modulations is the same function as evaluating the whole head at every step."""
    cfg, variables = golden_model(scan_layers=False)
    head = variables["params"]["image_head"]
    module = head_module(head, dtype)
    assert (module.dim, module.num_layers, module.mlp_ratio) == (cfg.fm_head_dim, cfg.fm_head_layers,
                                                                 cfg.fm_head_mlp_ratio)
    c = jax.random.normal(jax.random.key(0), (6, cfg.hidden_size)).astype(dtype)
    kw = dict(cfg_mult=3, guidance_scale=3.0, image_guidance_scale=1.5, num_steps=6, timesteps_shift=3.2, grid=grid,
              method=method, key=jax.random.key(1))
    expected = sample_head(module, {"params": head}, c, precompute_modulations=False, **kw)
    got = sample_head(module, {"params": head}, c, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_guidance_schedules():
    assert guidance_at("constant", 7.5, 3, 10) == 7.5
    assert guidance_at("linear", 7.5, 0, 10) == 7.5 and guidance_at("linear", 7.5, 5, 10) == pytest.approx(4.25)
    assert float(guidance_at("linear_increasing", 7.5, 0, 10)) == pytest.approx(3.75)
    assert float(guidance_at("linear_increasing", 7.5, 10, 10)) == pytest.approx(7.5)
