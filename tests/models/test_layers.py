"""RMSNorm, RoPE and the SwiGLU MLP against float64 numpy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from nextstep_jax.models.layers import MLP, RMSNorm, apply_rope, rope_tables


def _rms_ref(x, w, eps):
    x = x.astype(np.float64)
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def test_rmsnorm_float32_matches_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 48)).astype(np.float32) * 3
    w = (1 + 0.1 * rng.standard_normal(48)).astype(np.float32)
    y = RMSNorm(1e-5).apply({"params": {"scale": w}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), _rms_ref(x, w, 1e-5), rtol=2e-6, atol=2e-6)


def test_rmsnorm_bf16_rounds_before_weight():
    """Reference rounding: normalise in f32, cast to bf16, THEN multiply by the (bf16) weight."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32)).astype(ml_dtypes.bfloat16)
    w = (1 + 0.1 * rng.standard_normal(32)).astype(np.float32)
    y = np.asarray(RMSNorm(1e-5).apply({"params": {"scale": w}}, jnp.asarray(x)))
    x32 = x.astype(np.float32)
    normed = (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(ml_dtypes.bfloat16)
    expected = (w.astype(ml_dtypes.bfloat16).astype(np.float32) * normed.astype(np.float32)).astype(ml_dtypes.bfloat16)
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.astype(np.float32), expected.astype(np.float32))


def _rope_ref(x, positions, theta):
    """float64 rotate-half RoPE: x [B, T, H, D], positions [B, T]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[..., None].astype(np.float64) * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = np.concatenate([-x2, x1], -1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_matches_float64(theta):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    positions = np.array([np.arange(7), np.arange(100, 107)])
    cos, sin = rope_tables(jnp.asarray(positions), 16, theta, jnp.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    # angles up to ~100 rad: float32 argument rounding dominates (|err| ~ 1e-5)
    np.testing.assert_allclose(got, _rope_ref(x, positions, theta), atol=5e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)

    def score(m, n):
        cq, sq = rope_tables(jnp.array([[m]]), 32, 1e4, jnp.float32)
        ck, sk = rope_tables(jnp.array([[n]]), 32, 1e4, jnp.float32)
        return float(jnp.sum(apply_rope(jnp.asarray(q), cq, sq) * apply_rope(jnp.asarray(k), ck, sk)))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_swiglu_mlp_matches_float64():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    mlp = MLP(8, 12)
    params = jax.tree.map(np.asarray, nn.unbox(mlp.init(jax.random.key(0), jnp.asarray(x))["params"]))
    got = np.asarray(mlp.apply({"params": params}, jnp.asarray(x)))
    x64 = x.astype(np.float64)
    gate = x64 @ params["gate_proj"]["kernel"]
    up = x64 @ params["up_proj"]["kernel"]
    ref = (gate / (1 + np.exp(-gate)) * up) @ params["down_proj"]["kernel"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_projection_matches_dense_general_and_keeps_its_rank_under_a_mesh():
    """Same kernel values and outputs as nn.DenseGeneral for the same key, but created in its real shape, so a
    live rank-3 sharding constraint accepts it (DenseGeneral initialises a flattened 2-D kernel)."""
    from nextstep_jax.models.layers import Projection
    from nextstep_jax.sharding import make_mesh, use_mesh

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 8)), jnp.float32)
    ours = Projection((3, 4), ("embed", "heads", "head_dim"), use_bias=True)
    ref = nn.DenseGeneral((3, 4), use_bias=True, kernel_init=nn.initializers.normal(0.02))
    key = jax.random.key(0)
    with use_mesh(make_mesh({"fsdp": 1}, devices=jax.devices()[:1])):
        boxed = ours.init(key, x)
    assert boxed["params"]["kernel"].names == ("embed", "heads", "head_dim")
    assert boxed["params"]["kernel"].value.shape == (8, 3, 4)
    variables = nn.unbox(boxed)
    ref_vars = ref.init(key, x)
    np.testing.assert_array_equal(variables["params"]["kernel"], ref_vars["params"]["kernel"])
    variables["params"]["bias"] = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-6, atol=1e-6)
    # Contracting two input axes (o_proj: [heads, head_dim] -> embed).
    out = Projection((6,), ("heads", "head_dim", "embed"), in_axes=2)
    v = out.init(key, x.reshape(2, 5, 2, 4))
    ref2 = nn.DenseGeneral(6, axis=(-2, -1), use_bias=False, kernel_init=nn.initializers.normal(0.02))
    np.testing.assert_allclose(out.apply(nn.unbox(v), x.reshape(2, 5, 2, 4)),
                               ref2.apply(nn.unbox(v), x.reshape(2, 5, 2, 4)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length_split", [False, True])
def test_projection_gradients_match_float64(monkeypatch, length_split):
    """Both forms of the product (one 2-D matmul over merged rows; [B, T, ...] kept when the mesh splits the
    length) give float64 numpy's output and gradients, here for o_proj's two contracted axes."""
    from nextstep_jax.models import layers

    monkeypatch.setattr(layers, "sequence_is_split", lambda: length_split)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    kernel = rng.standard_normal((3, 4, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    g = rng.standard_normal((2, 5, 6)).astype(np.float32)
    proj = layers.Projection((6,), ("heads", "head_dim", "embed"), in_axes=2, use_bias=True)
    loss = lambda p, x: jnp.sum(proj.apply({"params": p}, x) * g)
    params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    y = proj.apply({"params": params}, jnp.asarray(x))
    (dp, dx) = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    x64, k64, g64 = x.astype(np.float64), kernel.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(y, np.einsum("btij,ijo->bto", x64, k64) + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["kernel"], np.einsum("btij,bto->ijo", x64, g64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["bias"], g64.sum((0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum("bto,ijo->btij", g64, k64), rtol=1e-5, atol=1e-5)
