"""The joint loss against an independent float64 computation from the model's own logits, including
text-only batches, label masking, padding and packed-document boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.models.nextstep import IGNORE_INDEX, NextStep


def _ce_ref(logits, labels, valid):
    """Mean CE over valid next-token pairs: position i predicts labels[i+1]."""
    logits = logits[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.clip(target, 0, None)[..., None], -1)[..., 0]
    mask = valid & (target != IGNORE_INDEX)
    return float(((logz - picked) * mask).sum() / mask.sum())


@pytest.fixture
def model(golden_model):
    cfg, variables = golden_model()
    return cfg, NextStep(cfg), variables


def test_text_only_batch(model):
    cfg, m, variables = model
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.boi, (2, 9)).astype(np.int32)
    labels = ids.copy()
    labels[0, 3] = IGNORE_INDEX
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding: its labels must not count
    labels[1, :2] = IGNORE_INDEX
    with jax.default_matmul_precision("highest"):
        loss, metrics = m.apply(variables, jnp.asarray(ids), jnp.asarray(labels), attention_mask_2d=jnp.asarray(mask),
                                method=NextStep.loss)
        logits = np.asarray(m.apply(variables, m.apply(variables, jnp.asarray(ids), attention_mask_2d=jnp.asarray(mask)),
                                    method=NextStep.logits))
    expected = _ce_ref(logits, labels, mask[:, 1:].astype(bool))
    assert float(metrics["lm_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["im_loss"]) == 0.0 and float(metrics["image_tokens"]) == 0.0
    assert float(loss) == pytest.approx(cfg.lm_loss_weight * expected, rel=1e-5)
    assert float(metrics["lm_tokens"]) == (mask[:, 1:].astype(bool) & (labels[:, 1:] != IGNORE_INDEX)).sum()


def test_packed_boundaries_are_not_targets(model):
    cfg, m, variables = model
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.boi, (1, 10)).astype(np.int32)
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]], np.int32)
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]], np.int32)
    labels = ids.copy()
    with jax.default_matmul_precision("highest"):
        _, metrics = m.apply(variables, jnp.asarray(ids), jnp.asarray(labels), segment_ids=jnp.asarray(segments),
                             positions=jnp.asarray(positions), method=NextStep.loss)
        hidden = m.apply(variables, jnp.asarray(ids), segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions))
        logits = np.asarray(m.apply(variables, hidden, method=NextStep.logits))
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    assert float(metrics["lm_tokens"]) == same_doc.sum() == 7
    assert float(metrics["lm_loss"]) == pytest.approx(_ce_ref(logits, labels, same_doc), rel=1e-5)


def test_image_only_batch_has_zero_lm_loss(model):
    cfg, m, variables = model
    ids = np.full((1, 6), cfg.image_placeholder_id, np.int32)
    ids[0, 0] = cfg.boi
    labels = np.full_like(ids, IGNORE_INDEX)
    tokens = np.random.default_rng(2).standard_normal((1, 6, 64)).astype(np.float32)
    loss, metrics = m.apply(variables, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(tokens),
                            rng=jax.random.key(0), method=NextStep.loss)
    assert float(metrics["lm_loss"]) == 0.0 and float(metrics["image_tokens"]) == 5
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(cfg.im_loss_weight * float(metrics["im_loss"]))
