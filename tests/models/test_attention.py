"""Attention masks and the attention kernel against brute-force / float64 numpy references."""

import jax.numpy as jnp
import numpy as np

from nextstep_jax.models.attention import attention_mask, dot_product_attention


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
    got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 1, 3)),
                                           jnp.asarray(v.transpose(0, 2, 1, 3)), jnp.asarray(mask)))
    assert np.all(np.isfinite(got))
    ref = _attention_ref(q, k, v, mask)
    rows = np.broadcast_to(valid[:, :, None, None], got.shape)
    np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-6)


def test_jax_nn_path_matches_xla_path():
    """The jax.nn.dot_product_attention route (used on GPU) agrees with ours on valid rows."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 4, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 2, 4, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 2, 4, 8)), jnp.float32)
    mask = attention_mask(jnp.arange(4), jnp.ones((1, 4), bool))
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, mask, impl="jax")),
                               np.asarray(dot_product_attention(q, k, v, mask, impl="xla")), rtol=1e-5, atol=1e-6)
