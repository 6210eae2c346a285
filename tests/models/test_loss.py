"""The joint loss against an independent float64 computation from the model's own logits, including
text-only batches, label masking, padding and packed-document boundaries; sequence chunking against the golden
training case; per-row keys that make microbatch losses add up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golden_inputs import image_loss_mask, image_tokens
from nextstep_jax.configs import replace
from nextstep_jax.models.nextstep import IGNORE_INDEX, NextStep, loss_counts, token_dim
from numerics import assert_close_rel


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
    tokens = np.random.default_rng(2).standard_normal((1, 6, token_dim(cfg))).astype(np.float32)
    loss, metrics = m.apply(variables, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(tokens),
                            rng=jax.random.key(0), method=NextStep.loss)
    assert float(metrics["lm_loss"]) == 0.0 and float(metrics["image_tokens"]) == 5
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(cfg.im_loss_weight * float(metrics["im_loss"]))


def _golden_training_inputs(cfg, case, prefix):
    ids = case[f"{prefix}_input_ids"]
    latents = [case[k] for k in sorted(case) if k.startswith(f"{prefix}_latent") and not k.endswith("_mask")]
    return (jnp.asarray(ids), jnp.asarray(case[f"{prefix}_labels"]), image_tokens(cfg, ids, latents),
            image_loss_mask(cfg, ids, latents, case[f"{prefix}_latents_mask"]))


@pytest.mark.parametrize("prefix", ["g1", "g2"])
def test_chunked_loss_matches_golden_and_one_chunk(golden_model, load_case, prefix):
    """Sequence chunks (dividing T or not) change neither the golden loss nor the gradients."""
    case = load_case("g_train_loss")
    cfg, variables = golden_model(loss_uses_out_projector=False)
    inputs = _golden_training_inputs(cfg, case, prefix)
    t = inputs[0].shape[1]
    results = {}
    for chunk in (t, 7, 1):
        model = NextStep(replace(cfg, loss_chunk_size=chunk))

        def loss_fn(v):
            return model.apply(v, *inputs, fm_noise=jnp.asarray(case[f"{prefix}_noise"]),
                               fm_u=jnp.asarray(case[f"{prefix}_u"]), method=NextStep.loss)

        with jax.default_matmul_precision("highest"):
            results[chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables)
    for chunk, ((_, metrics), grads) in results.items():
        for name in ("loss", "lm_loss", "im_loss"):
            assert_close_rel(metrics[name], case[f"{prefix}_{name}"], 1e-4, f"chunk {chunk} {name}")
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[t][1])):
            assert_close_rel(a, b, 1e-5, f"chunk {chunk} grads")


def test_rows_with_their_own_keys_add_up(golden_model):
    """With one key per row and the whole batch's counts as ``totals``, the loss of a batch is the sum of the
    losses of its rows: what microbatching relies on."""
    cfg, variables = golden_model()
    m = NextStep(cfg)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.boi, (3, 10)).astype(np.int32)
    ids[:, 3:7] = cfg.image_placeholder_id
    labels = np.where(ids == cfg.image_placeholder_id, IGNORE_INDEX, ids)
    tokens = rng.standard_normal((3, 10, token_dim(cfg))).astype(np.float32)
    keys = jax.random.split(jax.random.key(9), 3)
    totals = loss_counts(cfg, jnp.asarray(ids), jnp.asarray(labels))
    with jax.default_matmul_precision("highest"):
        whole, metrics = m.apply(variables, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(tokens), rng=keys,
                                 totals=totals, method=NextStep.loss)
        own, _ = m.apply(variables, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(tokens), rng=keys,
                         method=NextStep.loss)
        parts = [m.apply(variables, jnp.asarray(ids[i:i + 1]), jnp.asarray(labels[i:i + 1]),
                         jnp.asarray(tokens[i:i + 1]), rng=keys[i:i + 1], totals=totals, method=NextStep.loss)[0]
                 for i in range(3)]
    assert float(whole) == pytest.approx(float(own), rel=1e-6)
    assert float(whole) == pytest.approx(sum(float(p) for p in parts), rel=1e-5)
    assert float(metrics["image_tokens"]) == 3 * 4 and float(metrics["lm_tokens"]) == float(totals["lm_tokens"])


@pytest.mark.parametrize("prefix", ["g1", "g2"])
def test_image_targets_gathered_per_row_match_every_position(golden_model, load_case, prefix):
    """The FM head on each row's image targets gathered into ``image_positions`` slots (exactly the most any
    row holds, or more) gives the loss and gradients of the head on every position, with the golden noise
    injected and with per-row keys; in several chunks too."""
    case = load_case("g_train_loss")
    cfg, variables = golden_model(loss_uses_out_projector=False)
    inputs = _golden_training_inputs(cfg, case, prefix)
    ids = np.asarray(inputs[0])
    most = int(((np.roll(ids, -1, axis=1) == cfg.image_placeholder_id)[:, :-1]).sum(1).max())
    keys = jax.random.split(jax.random.key(3), ids.shape[0])
    draws = {"golden": (dict(fm_noise=jnp.asarray(case[f"{prefix}_noise"]), fm_u=jnp.asarray(case[f"{prefix}_u"])),
                        ((None, 1024), (most, 1024), (most + 3, 3))),
             "keys": (dict(rng=keys), ((None, 1024), (most, 1024)))}
    for name, (kwargs, variants) in draws.items():
        results = {}
        for slots, chunk in variants:
            model = NextStep(replace(cfg, loss_chunk_size=chunk))

            def loss_fn(v):
                return model.apply(v, *inputs, image_positions=slots, method=NextStep.loss, **kwargs)

            with jax.default_matmul_precision("highest"):
                results[slots, chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables)
        (_, full), full_grads = results[None, 1024]
        if name == "golden":
            assert_close_rel(full["im_loss"], case[f"{prefix}_im_loss"], 1e-4, "every position im_loss")
        for key, ((_, metrics), grads) in results.items():
            for metric in ("loss", "lm_loss", "im_loss", "image_tokens"):
                assert_close_rel(metrics[metric], full[metric], 1e-6, f"{name} {key} {metric}")
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
                assert_close_rel(a, b, 1e-5, f"{name} {key} grads")


def _ramp_reference(cfg, ids: np.ndarray) -> np.ndarray:
    """float64 walk: an image's placeholders (between BOI and the next EOI or the row's end) get
    linspace(0, noise_strength, n)."""
    std = np.zeros(ids.shape)
    for b, row in enumerate(ids):
        image = []
        for i, tok in enumerate(list(row) + [cfg.boi]):  # a sentinel BOI closes an image cut by the row's end
            if tok in (cfg.boi, cfg.eoi) and image:
                std[b, image] = np.linspace(0.0, cfg.noise_strength, len(image)) if len(image) > 1 else 0.0
                image = []
            elif tok == cfg.image_placeholder_id:
                image.append(i)
    return std


def test_input_noise_ramps_over_each_image_and_spares_the_targets(golden_model, load_case):
    """``noise_strength``: the model reads each input image token plus N(0, std²) with std ramping from 0 to
    noise_strength over its image (the float64 walk above), drawn from the row's key folded with 1, while the
    flow-matching targets stay the clean tokens: the same losses as a model fed those noised inputs by hand."""
    case, prefix = load_case("g_train_loss"), "g1"
    cfg, variables = golden_model()
    cfg = replace(cfg, noise_strength=0.7)
    ids, labels, tokens, mask = _golden_training_inputs(cfg, case, prefix)
    keys = jax.random.split(jax.random.key(5), ids.shape[0])
    std = _ramp_reference(cfg, np.asarray(ids))
    assert std.max() == pytest.approx(0.7) and (std[np.asarray(ids) != cfg.image_placeholder_id] == 0).all()
    draws = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 1), tokens.shape[1:])) for k in keys])
    noised = jnp.asarray(np.asarray(tokens, np.float64) + std[..., None] * draws, jnp.float32)

    class FedByHand(NextStep):
        def __call__(self, input_ids, image_tokens=None, *args, **kwargs):
            return super().__call__(input_ids, noised, *args, **kwargs)

    def losses(model):
        return jax.jit(lambda v: model.apply(v, ids, labels, tokens, mask, rng=keys, method=NextStep.loss)[1])(
            variables)

    with jax.default_matmul_precision("highest"):
        got, want = losses(NextStep(cfg)), losses(FedByHand(replace(cfg, noise_strength=0.0)))
        clean = losses(NextStep(replace(cfg, noise_strength=0.0)))
    for metric in ("loss", "lm_loss", "im_loss"):
        assert_close_rel(got[metric], want[metric], 1e-6, metric)
    assert abs(float(got["im_loss"]) - float(clean["im_loss"])) > 1e-4  # the noise does reach the model
    with pytest.raises(ValueError, match="noise_strength=0.7 needs `rng`"):
        NextStep(cfg).apply(variables, ids, labels, tokens, mask, fm_noise=jnp.asarray(case[f"{prefix}_noise"]),
                            fm_u=jnp.asarray(case[f"{prefix}_u"]), method=NextStep.loss)


@pytest.mark.parametrize("prefix", ["g1", "g2"])
def test_text_targets_gathered_per_row_match_every_position(golden_model, load_case, prefix):
    """The LM head on each row's text targets gathered into ``text_positions`` slots gives the golden loss and
    the gradients of the head on every position: with exactly the most any row holds (gathered), in several
    chunks, and with one slot too few (then it runs on every position, and says so)."""
    case = load_case("g_train_loss")
    cfg, variables = golden_model(loss_uses_out_projector=False)
    inputs = _golden_training_inputs(cfg, case, prefix)
    counts = loss_counts(cfg, *inputs[:2], image_loss_mask=inputs[3], with_images=True)
    ids, labels = np.asarray(inputs[0]), np.asarray(inputs[1])
    text = (np.roll(ids, -1, axis=1) != cfg.image_placeholder_id) & (np.roll(labels, -1, axis=1) != IGNORE_INDEX)
    most = int(text[:, :-1].sum(1).max())
    assert 0 < most < ids.shape[1] - 1
    results = {}
    for slots, chunk in ((None, 1024), (most, 1024), (most + 2, 3), (most - 1, 1024)):
        model = NextStep(replace(cfg, loss_chunk_size=chunk))

        def loss_fn(v):
            return model.apply(v, *inputs, text_positions=slots, fm_noise=jnp.asarray(case[f"{prefix}_noise"]),
                               fm_u=jnp.asarray(case[f"{prefix}_u"]), method=NextStep.loss)

        with jax.default_matmul_precision("highest"):
            results[slots, chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables)
    (_, full), full_grads = results[None, 1024]
    for name in ("loss", "lm_loss", "im_loss"):
        assert_close_rel(full[name], case[f"{prefix}_{name}"], 1e-4, f"every position {name}")
    for (slots, chunk), ((_, metrics), grads) in results.items():
        assert float(metrics["lm_gathered"]) == float(slots is not None and slots >= most), (slots, chunk)
        assert float(metrics["lm_tokens"]) == float(counts["lm_tokens"]) == text[:, :-1].sum()
        for name in ("loss", "lm_loss", "im_loss"):
            assert_close_rel(metrics[name], full[name], 1e-6, f"slots {slots} chunk {chunk} {name}")
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
            assert_close_rel(a, b, 1e-5, f"slots {slots} chunk {chunk} grads")
