"""VAE: golden parity (case h_vae), released-config shape/count, independent float64 block checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta
from numerics import assert_close_rel

from nextstep_jax.checkpoint import load_vae
from nextstep_jax.checkpoint.mapping import vae_table
from nextstep_jax.configs import vae_config
from nextstep_jax.models import vae as V
from nextstep_jax.latents import patchify

F32_TOL = 1e-4
# bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ≈ 4e-3 per rounding); accumulated over the ~40
# convs/norms of the golden VAE the observed error is ~2e-2 of max|ref| (the encoder_norm division by a
# small token std amplifies it most), so 5e-2 has margin yet still catches wiring bugs, which are O(1).
BF16_TOL = 5e-2


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden_vae(golden_dir):
    return load_vae(golden_dir / "vae")


@functools.cache
def _forward(cfg_items: tuple):
    """One compiled program per config: moments, (mean, logvar) and the decode of a given latent."""
    model = V.AutoencoderKL(vae_config(**dict(cfg_items)))

    def run(params, x, z):
        p = {"params": params}
        return (model.apply(p, x, method=V.AutoencoderKL.encode_moments),
                model.apply(p, x, method=V.AutoencoderKL.encode),
                model.apply(p, z, method=V.AutoencoderKL.decode))

    return jax.jit(run)


def _items(cfg, **overrides):
    d = dict(cfg.to_dict(), **overrides)
    d["ch_mult"] = tuple(d["ch_mult"])
    return tuple(sorted(d.items()))


@pytest.mark.parametrize("dtype,tol", [("float32", F32_TOL), ("bfloat16", BF16_TOL)])
def test_h_vae_parity(golden_vae, load_case, dtype, tol):
    cfg, params = golden_vae
    case = load_case("h_vae")
    assert float(case["shift_factor"]) == pytest.approx(cfg.shift_factor)
    assert float(case["scaling_factor"]) == pytest.approx(cfg.scaling_factor)
    images = sorted(k[: -len("_x")] for k in case if k.endswith("_x"))
    assert images, "h_vae has no img*_x inputs"
    run = _forward(_items(cfg, dtype=dtype))
    for im in images:
        ref = {name: _nhwc(case[f"{im}_{name}"]) for name in
               ("moments_raw", "mean", "logvar", "eps", "sample", "decoded_mean", "norm_latent")}
        with jax.default_matmul_precision("highest"):
            moments, (mean, logvar), decoded = run(params, jnp.asarray(_nhwc(case[f"{im}_x"])),
                                                   jnp.asarray(ref["mean"]))
        sample = V.sample_posterior(mean, logvar, cfg, eps=jnp.asarray(ref["eps"]))
        got = dict(moments_raw=moments, mean=mean, logvar=logvar, sample=sample, decoded_mean=decoded,
                   norm_latent=V.to_model_latents(mean, cfg))
        for name, value in got.items():
            assert value.dtype == jnp.float32, name
            assert_close_rel(value, ref[name], tol, f"{im}_{name} ({dtype})")
        assert_close_rel(V.from_model_latents(jnp.asarray(ref["norm_latent"]), cfg), ref["mean"], 1e-6,
                         f"{im} from_model_latents")


def test_released_config_param_count_and_table():
    cfg = vae_config(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)
    shapes = meta.unbox(jax.eval_shape(V.AutoencoderKL(cfg).init, jax.random.key(0),
                                       jax.ShapeDtypeStruct((1, 16, 16, cfg.in_channels), jnp.float32)))
    leaves = {tuple(k.key for k in path): leaf for path, leaf in
              jax.tree_util.tree_leaves_with_path(shapes["params"])}
    assert len(leaves) == 244
    assert sum(int(np.prod(v.shape)) for v in leaves.values()) == 83_819_683
    assert sum(int(np.prod(v.shape)) for k, v in leaves.items() if k[0] == "encoder") == 34_274_208
    assert all(v.dtype == jnp.float32 for v in leaves.values())
    table = vae_table(cfg)
    assert {e.flax_path: e.flax_shape for e in table} == {k: v.shape for k, v in leaves.items()}
    assert len({e.torch_key for e in table}) == 244
    assert sum(int(np.prod(e.torch_shape)) for e in table) == 83_819_683
    by_key = {e.torch_key: e for e in table}
    assert by_key["encoder.down.1.block.0.nin_shortcut.weight"].torch_shape == (256, 128, 1, 1)
    assert by_key["decoder.up.1.block.0.nin_shortcut.weight"].torch_shape == (256, 512, 1, 1)
    assert by_key["decoder.up.3.upsample.conv.weight"].flax_shape == (3, 3, 512, 512)
    assert by_key["encoder.conv_out.weight"].torch_shape == (32, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in by_key
    assert "encoder.down.3.downsample.conv.weight" not in by_key


def test_param_logical_axes():
    cfg = vae_config(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    boxed = jax.eval_shape(V.AutoencoderKL(cfg).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    assert all(isinstance(x, meta.Partitioned) for x in leaves)
    kernel = boxed["decoder"]["up_1"]["block_0"]["conv1"]["kernel"]
    assert kernel.names == ("conv_height", "conv_width", "conv_in", "conv_out")
    assert boxed["encoder"]["mid"]["attn_1"]["norm"]["scale"].names == ("vae_channels",)
    assert boxed["decoder"]["conv_out"]["kernel"].names[-1] is None  # 3 RGB channels stay replicated


def _init_params(module, x, seed):
    """Module params with every leaf replaced by random values (init gives ones/zeros for norms)."""
    params = meta.unbox(module.init(jax.random.key(0), x))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)


def test_groupnorm_matches_float64_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 5, 64)) * 3 + 1).astype(np.float32)
    params = _init_params(V.GroupNorm(), x, 1)
    got = np.asarray(V.GroupNorm().apply({"params": params}, x))
    g = x.astype(np.float64).reshape(2, 3, 5, V.NUM_GROUPS, 64 // V.NUM_GROUPS)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    ref = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * params["scale"] + params["bias"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h,w", [(5, 7), (6, 8)])
def test_downsample_pads_right_bottom(h, w):
    rng = np.random.default_rng(h)
    x = rng.standard_normal((1, h, w, 2)).astype(np.float32)
    params = _init_params(V.Downsample(), x, 2)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(V.Downsample().apply({"params": params}, x))
    k, b = params["conv"]["kernel"].astype(np.float64), params["conv"]["bias"]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
    oh, ow = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1
    ref = np.zeros((1, oh, ow, 2))
    for i in range(oh):
        for j in range(ow):
            ref[0, i, j] = np.einsum("hwi,hwio->o", xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], k) + b
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_encoder_norm_standardises_each_patch():
    cfg = vae_config(z_channels=16, psz=2, encoder_norm=True)
    rng = np.random.default_rng(0)
    mean = (rng.standard_normal((2, 4, 6, 16)) * rng.uniform(0.1, 5, (1, 1, 1, 16)) + 3).astype(np.float32)
    got = np.asarray(V.normalize_mean(jnp.asarray(mean), cfg), np.float64)
    for i in range(2):
        for j in range(3):
            patch = got[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(2, 64)
            np.testing.assert_allclose(patch.mean(-1), 0, atol=1e-5)
            np.testing.assert_allclose(patch.var(-1), 1, atol=1e-4)
            src = mean[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(2, 64).astype(np.float64)
            ref = (src - src.mean(-1, keepdims=True)) / np.sqrt(src.var(-1, keepdims=True) + 1e-6)
            np.testing.assert_allclose(patch, ref, atol=1e-5)
    off = vae_config(encoder_norm=False)
    np.testing.assert_array_equal(np.asarray(V.normalize_mean(jnp.asarray(mean), off)), mean)


def test_non_square_encode_decode(golden_vae):
    cfg, params = golden_vae
    f = V.downsample_factor(cfg) * cfg.psz
    h, w = 2 * f, 3 * f
    x = np.random.default_rng(0).uniform(-1, 1, (1, h, w, cfg.in_channels)).astype(np.float32)
    z_shape = (1, h // V.downsample_factor(cfg), w // V.downsample_factor(cfg), cfg.z_channels)
    moments, (mean, logvar), decoded = _forward(_items(cfg))(params, jnp.asarray(x), jnp.zeros(z_shape))
    assert moments.shape == z_shape[:3] + (2 * cfg.z_channels,)
    assert mean.shape == logvar.shape == z_shape
    assert decoded.shape == (1, h, w, cfg.out_ch)
    assert np.all(np.isfinite(np.asarray(decoded)))
    if cfg.encoder_norm:
        tokens = np.asarray(patchify(mean, cfg.psz), np.float64)
        np.testing.assert_allclose(tokens.var(-1), 1, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of"):
        V.AutoencoderKL(cfg).apply({"params": params}, jnp.zeros((1, h + f // 2, w, cfg.in_channels)),
                                   method=V.AutoencoderKL.encode_moments)


def test_sample_posterior_and_latent_spaces():
    mean = jnp.arange(8.0).reshape(1, 2, 2, 2)
    logvar = jnp.full_like(mean, 2 * np.log(0.5))
    eps = jnp.ones_like(mean)
    stochastic = vae_config(deterministic=False, scaling_factor=0.5, shift_factor=0.25)
    np.testing.assert_allclose(V.sample_posterior(mean, logvar, stochastic, eps=eps), mean + 0.5, rtol=1e-6)
    key = jax.random.key(3)
    np.testing.assert_array_equal(V.sample_posterior(mean, logvar, stochastic, key=key),
                                  V.sample_posterior(mean, logvar, stochastic, key=key))
    with pytest.raises(ValueError, match="PRNG key"):
        V.sample_posterior(mean, logvar, stochastic)
    np.testing.assert_array_equal(V.sample_posterior(mean, logvar, vae_config(deterministic=True), eps=eps), mean)
    np.testing.assert_allclose(V.to_model_latents(mean, stochastic), (mean - 0.25) * 0.5)
    np.testing.assert_allclose(V.from_model_latents(V.to_model_latents(mean, stochastic), stochastic), mean)
