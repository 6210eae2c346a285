"""The segment-id kernels against the dense-mask path: the splash kernel (run on CPU by the Pallas interpreter,
the same kernel code the TPU compiles) on packed, padded batches against float64 numpy and our XLA kernel, and a
packed batch through the whole golden model: same loss and gradients with attention_impl "xla" and "splash"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.configs import replace
from nextstep_jax.models.attention import Masking, xla_attention
from nextstep_jax.models.attention_kernels import splash_attention
from nextstep_jax.models.nextstep import NextStep, token_dim
from numerics import assert_close_rel


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _reference(q, k, v, seg):
    """float64: causal, same document, real keys only; GQA by repeat-interleave of the KV heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    t = q.shape[1]
    visible = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    visible |= np.eye(t, dtype=bool)[None] & (seg <= 0)[:, :, None]  # padding rows: anything finite (unread)
    scores = np.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(visible[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", p, v)


def _qkv(rng, b, t, heads, kv, d):
    return (jnp.asarray(rng.standard_normal((b, t, heads, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, kv, t, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, kv, t, d)), jnp.float32))


@pytest.mark.parametrize("t,block", [(256, 128), (200, 128), (37, 512)])
def test_splash_matches_float64_on_packed_padded_rows(golden_model, t, block):
    """Tiles that divide the sequence, a sequence padded to the tiles, and tiles clipped to a short sequence."""
    cfg, _ = golden_model()
    rng = np.random.default_rng(t)
    q, k, v = _qkv(rng, 2, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    cut = [t // 5, t // 2, t - t // 6]
    seg = np.zeros((2, t), np.int32)
    seg[0, :cut[0]], seg[0, cut[0]:cut[1]], seg[0, cut[1]:cut[2]] = 1, 2, 3  # trailing padding
    seg[1] = np.where(np.arange(t) < cut[1], 1, 2)  # no padding
    masking = Masking.documents(2, t, segment_ids=jnp.asarray(seg))
    got = np.asarray(splash_attention(q, k, v, masking.kernel_segments(), block_q=block, block_kv=block))
    assert np.all(np.isfinite(got))
    real = seg > 0
    assert_close_rel(got[real], _reference(q, k, v, seg)[real], 1e-5, "splash vs float64")
    dense = np.asarray(xla_attention(q, k, v, masking.dense()))
    assert_close_rel(got[real], dense[real], 1e-5, "splash vs xla kernel")


def test_splash_without_segments_is_causal_attention(golden_model):
    cfg, _ = golden_model()
    t = 128
    q, k, v = _qkv(np.random.default_rng(5), 1, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    got = splash_attention(q, k, v, None, block_q=128, block_kv=128)
    assert_close_rel(got, _reference(q, k, v, np.ones((1, t), np.int32)), 1e-5, "causal splash")


def test_splash_gradients_match_the_xla_kernel(golden_model):
    """The kernel's own backward pass (dq, dk, dv kernels) against autodiff through the dense path, with a loss
    that reads real queries only."""
    cfg, _ = golden_model()
    t = 256
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 1, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    seg = np.where(np.arange(t) < 100, 1, np.where(np.arange(t) < 230, 2, 0))[None].astype(np.int32)
    masking = Masking.documents(1, t, segment_ids=jnp.asarray(seg))
    weight = jnp.asarray(rng.standard_normal((1, t, cfg.num_heads, cfg.head_dim)) * (seg > 0)[..., None, None],
                         jnp.float32)
    segments, dense = masking.kernel_segments(), masking.dense()
    splash_loss = lambda q, k, v: jnp.sum(weight * splash_attention(q, k, v, segments, block_q=128, block_kv=128))
    dense_loss = lambda q, k, v: jnp.sum(weight * xla_attention(q, k, v, dense))
    got = jax.jit(jax.grad(splash_loss, argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        assert_close_rel(a, b, 1e-5, f"d{name}")


def _packed_batch(cfg, rows, length, seed):
    """Rows of packed documents (a caption, an image run, a second caption) with trailing padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.boi, (rows, length)).astype(np.int32)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        start = 0
        for doc, n in enumerate((length // 3 + r, length // 4, length // 5 - r), start=1):
            seg[r, start:start + n] = doc
            pos[r, start:start + n] = np.arange(n)
            ids[r, start + 3:start + 3 + n // 2] = cfg.image_placeholder_id
            start += n
        ids[r, start:] = cfg.pad_token_id
    labels = np.where((ids == cfg.image_placeholder_id) | (seg == 0), -100, ids).astype(np.int32)
    return dict(input_ids=ids, labels=labels, segment_ids=seg, positions=pos,
                image_loss_mask=(ids == cfg.image_placeholder_id).astype(np.int32),
                image_tokens=rng.standard_normal((rows, length, token_dim(cfg))).astype(np.float32))


def test_packed_batch_loss_is_the_same_through_dense_and_segment_paths(golden_model):
    """The golden model on a packed, padded batch: loss, its parts and every gradient agree (float32) between the
    dense-mask XLA kernel and the segment-id splash kernel."""
    cfg, variables = golden_model()
    batch = {k: jnp.asarray(v) for k, v in _packed_batch(cfg, 2, 160, 11).items()}

    def loss_and_grads(impl):
        model = NextStep(replace(cfg, attention_impl=impl, attention_block_q=128, attention_block_kv=128))

        def loss(params):
            return model.apply({"params": params}, batch["input_ids"], batch["labels"], batch["image_tokens"],
                               batch["image_loss_mask"], segment_ids=batch["segment_ids"],
                               positions=batch["positions"], rng=jax.random.key(3), method=NextStep.loss)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (dense_loss, dense_metrics), dense_grads = loss_and_grads("xla")
    (seg_loss, seg_metrics), seg_grads = loss_and_grads("splash")
    assert dense_metrics["lm_tokens"] > 0 and dense_metrics["image_tokens"] > 0
    for key in ("loss", "lm_loss", "im_loss", "lm_tokens", "image_tokens"):
        assert float(seg_metrics[key]) == pytest.approx(float(dense_metrics[key]), rel=1e-5), key
    assert np.isfinite(float(seg_loss))
    flat_dense = jax.tree_util.tree_leaves_with_path(dense_grads)
    for (path, a), b in zip(flat_dense, jax.tree.leaves(seg_grads)):
        assert_close_rel(b, a, 1e-4, jax.tree_util.keystr(path))
