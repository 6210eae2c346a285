"""Attention masks, kernel selection and the XLA kernel against brute-force / float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.models.attention import (PADDING_SEGMENT, Masking, attention_mask, select_kernel, target_platform,
                                           xla_attention)
from nextstep_jax.models.attention_kernels import cudnn_attention
from nextstep_jax.sharding import make_mesh, use_mesh


def _mask_ref(q_slots, kv_valid, q_seg=None, kv_seg=None):
    b, s = kv_valid.shape
    t = q_slots.shape[-1]
    out = np.zeros((b, 1, t, s), bool)
    for bi in range(b):
        for i in range(t):
            for j in range(s):
                ok = j <= q_slots[bi, i] and kv_valid[bi, j]
                if q_seg is not None:
                    ok = ok and q_seg[bi, i] == kv_seg[bi, j]
                out[bi, 0, i, j] = ok
    return out


def test_causal_padding_mask():
    valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    slots = np.broadcast_to(np.arange(5), (2, 5))
    np.testing.assert_array_equal(np.asarray(attention_mask(jnp.arange(5), jnp.asarray(valid))),
                                  _mask_ref(slots, valid))


def test_decode_mask_over_static_cache():
    valid = np.array([[0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]], bool)
    q = np.array([[3], [3]])
    np.testing.assert_array_equal(np.asarray(attention_mask(jnp.array([3]), jnp.asarray(valid))), _mask_ref(q, valid))


def test_segment_mask():
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    slots = np.broadcast_to(np.arange(6), (2, 6))
    got = attention_mask(jnp.arange(6), jnp.asarray(seg > 0), jnp.asarray(seg), jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(got), _mask_ref(slots, seg > 0, seg, seg))


def _attention_ref(q, k, v, mask):
    """float64, GQA by repeat-interleave of kv heads, additive finfo(f32).min mask like the reference."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, np.finfo(np.float32).min)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_gqa_attention_matches_float64_and_padded_rows_stay_finite():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    mask = np.asarray(attention_mask(jnp.arange(5), jnp.asarray(valid)))
    got = np.asarray(xla_attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 1, 3)),
                                   jnp.asarray(v.transpose(0, 2, 1, 3)), jnp.asarray(mask)))
    assert np.all(np.isfinite(got))
    ref = _attention_ref(q, k, v, mask)
    rows = np.broadcast_to(valid[:, :, None, None], got.shape)
    np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-6)


def _packed_masking(seg, valid=None):
    seg = np.asarray(seg)
    return Masking.documents(seg.shape[0], seg.shape[1], None if valid is None else jnp.asarray(valid),
                             jnp.asarray(seg))


def test_cudnn_call_matches_xla_path_on_real_rows():
    """The jax.nn.dot_product_attention call of the cuDNN route (run here by jax.nn's XLA implementation, same
    arguments) agrees with ours on every real query of a packed, padded batch."""
    rng = np.random.default_rng(1)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 5, 5, 0]])
    q = jnp.asarray(rng.standard_normal((2, 8, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 8, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 2, 8, 8)), jnp.float32)
    masking = _packed_masking(seg)
    got = np.asarray(cudnn_attention(q, k, v, masking.kernel_segments(), implementation="xla"))
    ref = np.asarray(xla_attention(q, k, v, masking.dense()))
    real = seg > 0
    np.testing.assert_allclose(got[real], ref[real], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got))
    # One document per row and no padding: causality alone, no mask at all.
    plain = Masking.documents(2, 8)
    assert plain.kernel_segments() is None
    np.testing.assert_allclose(np.asarray(cudnn_attention(q, k, v, None, implementation="xla")),
                               np.asarray(xla_attention(q, k, v, plain.dense())), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("valid", [None, [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]])
def test_kernel_segments_see_what_the_dense_mask_sees(valid):
    """Causal + same kernel segment == the dense mask on every real query; no kernel row is empty (padding sees
    padding, so a flash kernel never divides by zero)."""
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 3, 3, 3, 3]])
    masking = _packed_masking(seg, valid)
    dense = np.asarray(masking.dense())[:, 0]
    ids = np.asarray(masking.kernel_segments())
    causal = np.tril(np.ones((8, 8), bool))
    kernel = causal[None] & (ids[:, :, None] == ids[:, None, :])
    real = (seg > 0) & (np.ones_like(seg, bool) if valid is None else np.asarray(valid, bool))
    np.testing.assert_array_equal(kernel[real], dense[real])
    np.testing.assert_array_equal(ids[~real], PADDING_SEGMENT)
    assert kernel.any(-1).all()


def test_masking_of_a_left_padded_prompt_equals_the_old_mask():
    """``Masking.documents`` with a 2-D attention mask only = causal + key padding, as before segments existed."""
    valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    got = Masking.documents(2, 5, jnp.asarray(valid)).dense()
    np.testing.assert_array_equal(np.asarray(got), _mask_ref(np.broadcast_to(np.arange(5), (2, 5)), valid))


@pytest.mark.parametrize("platform,dtype,expected", [
    ("tpu", "float32", "splash"), ("tpu", "bfloat16", "splash"), ("gpu", "bfloat16", "cudnn"),
    ("gpu", "float16", "cudnn"), ("gpu", "float32", "xla"), ("cpu", "bfloat16", "xla")])
def test_auto_selects_the_backend_kernel(platform, dtype, expected):
    assert select_kernel("auto", decoding=False, dtype=dtype, platform=platform) == expected


@pytest.mark.parametrize("requested", ["auto", "xla", "splash", "cudnn"])
@pytest.mark.parametrize("platform", ["tpu", "gpu", "cpu"])
def test_decoding_always_runs_the_xla_kernel(requested, platform):
    assert select_kernel(requested, decoding=True, dtype="bfloat16", platform=platform) == "xla"


def test_explicit_kernels_and_bad_requests():
    for platform in ("tpu", "gpu", "cpu"):
        assert select_kernel("xla", decoding=False, dtype="bfloat16", platform=platform) == "xla"
        # Off TPU splash runs in the Pallas interpreter (tests).
        assert select_kernel("splash", decoding=False, dtype="float32", platform=platform) == "splash"
    assert select_kernel("cudnn", decoding=False, dtype="bfloat16", platform="gpu") == "cudnn"
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
        select_kernel("cudnn", decoding=False, dtype="bfloat16", platform="cpu")
    with pytest.raises(ValueError, match="model.attention_impl='jax'"):
        select_kernel("jax", decoding=False, dtype="bfloat16", platform="gpu")


def test_platform_comes_from_the_mesh_in_context():
    assert target_platform() == jax.default_backend()
    with use_mesh(make_mesh({"fsdp": 1}, jax.devices()[:1])):
        assert target_platform() == jax.devices()[0].platform
    # No platform given: the one in context decides (here the host's).
    assert select_kernel("auto", decoding=False, dtype="bfloat16") == (
        "splash" if jax.default_backend() == "tpu" else
        "cudnn" if jax.default_backend() == "gpu" else "xla")


@pytest.mark.parametrize("length_split", [False, True])
def test_gqa_attention_gradients_match_float64(monkeypatch, length_split):
    """The recomputed-probability backward pass (queries heads-major as one [G·T, D] block, or [G, T] kept
    apart when the mesh splits the length) against the closed-form gradients in float64."""
    from nextstep_jax.models import attention

    monkeypatch.setattr(attention, "sequence_is_split", lambda: length_split)
    rng = np.random.default_rng(5)
    b, t, h, kv, d = 2, 5, 6, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, kv, t, d)).astype(np.float32)
    v = rng.standard_normal((b, kv, t, d)).astype(np.float32)
    w = rng.standard_normal((b, t, h, d)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]], bool)
    mask = np.asarray(attention_mask(jnp.arange(t), jnp.asarray(valid)))
    grads = jax.grad(lambda q, k, v: jnp.sum(xla_attention(q, k, v, jnp.asarray(mask)) * w), argnums=(0, 1, 2))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    # float64: expand kv heads to query heads, then the softmax backward in closed form.
    rep = lambda x: np.repeat(x.astype(np.float64), h // kv, axis=1)  # [B, H, T, D]
    qh, kh, vh = q.astype(np.float64).transpose(0, 2, 1, 3), rep(k), rep(v)
    scores = np.where(mask, qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d), np.finfo(np.float32).min)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dout = w.astype(np.float64).transpose(0, 2, 1, 3)
    dp = dout @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) / np.sqrt(d)
    group = lambda x: x.reshape(b, kv, h // kv, t, d).sum(2)
    ref = ((ds @ kh).transpose(0, 2, 1, 3), group(ds.transpose(0, 1, 3, 2) @ qh), group(p.transpose(0, 1, 3, 2) @ dout))
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
