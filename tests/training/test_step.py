"""The train step on one device: its update equals the loss gradient pushed through optax by hand, microbatches
change nothing, a non-finite step is skipped and counted, the state is donated, a pixel batch of the data
pipeline (VAE in the step) gives the loss of the same images encoded outside, and optimizer moments take
their parameters' shardings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from nextstep_jax.checkpoint import load_model, load_vae
from nextstep_jax.configs import replace
from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_iterator
from nextstep_jax.data.tokenizer import load_tokenizer
from nextstep_jax.latents import patchify
from nextstep_jax.models.nextstep import NextStep, abstract_variables, token_dim
from nextstep_jax.models.vae import AutoencoderKL, to_model_latents
from nextstep_jax.sharding import make_mesh, shardings_of
from nextstep_jax.training.state import follow_params, init_train_state
from nextstep_jax.training.step import make_train_step
from numerics import assert_close_rel

# Adam's first step is ~lr·sign(g): eps well above float noise keeps updates comparable across summation orders.
OPTIMIZER = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def golden(golden_dir):
    cfg, params = load_model(golden_dir / "model")
    return cfg, params


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"fsdp": 1}, devices=jax.devices()[:1])


def _config(cfg, **train_step):
    return ml_collections.ConfigDict({"model": cfg.to_dict(), "train_step": {"microbatches": 1, **train_step}})


def _token_batch(cfg, rows=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.boi, (rows, length)).astype(np.int32)
    ids[:, 3:7] = cfg.image_placeholder_id
    return {"input_ids": ids, "labels": np.where(ids == cfg.image_placeholder_id, -100, ids).astype(np.int32),
            "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(length), ids.shape).astype(np.int32),
            "image_loss_mask": (ids == cfg.image_placeholder_id).astype(np.int32),
            "image_tokens": rng.standard_normal((rows, length, token_dim(cfg))).astype(np.float32)}


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_update_is_the_loss_gradient_through_optax(golden, mesh):
    cfg, params = golden
    model = NextStep(cfg)
    batch = _token_batch(cfg)
    state = init_train_state(cfg, OPTIMIZER, mesh, params=params, seed=5)
    before = _copy(state)
    state, metrics = make_train_step(_config(cfg), model, OPTIMIZER, mesh)(state, batch)

    # By hand: the documented keys (step key fold_in(rng, step), row key fold_in(step key, row), FM stream 0).
    step_key = jax.random.fold_in(jnp.asarray(before.rng), 0)
    fm_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(step_key, i), 0) for i in range(4)])

    def loss_fn(p):
        return model.apply({"params": p}, batch["input_ids"], batch["labels"], batch["image_tokens"],
                           batch["image_loss_mask"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                           rng=fm_keys, method=NextStep.loss)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(before.params)
    updates, _ = OPTIMIZER.update(grads, OPTIMIZER.init(before.params), before.params)
    expected = optax.apply_updates(before.params, updates)
    for name in ("loss", "lm_loss", "im_loss", "lm_tokens", "image_tokens"):
        assert float(metrics[name]) == pytest.approx(float(aux[name]), rel=1e-6), name
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 1 and int(state.skipped) == 0
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        assert_close_rel(got, want, 1e-5, "updated params")


def test_microbatches_give_the_whole_batch_step(golden, mesh):
    cfg, params = golden
    model = NextStep(cfg)
    batch = _token_batch(cfg, rows=4, seed=1)
    results = []
    for microbatches in (1, 2):
        state = init_train_state(cfg, OPTIMIZER, mesh, params=params)
        state, metrics = make_train_step(_config(cfg, microbatches=microbatches), model, OPTIMIZER, mesh)(state, batch)
        results.append((metrics, state.params))
    (ref_metrics, ref_params), *others = results
    for metrics, new_params in others:
        for name in ("loss", "lm_loss", "im_loss", "grad_norm", "lm_tokens", "image_tokens"):
            assert float(metrics[name]) == pytest.approx(float(ref_metrics[name]), rel=1e-5), name
        for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params)):
            assert_close_rel(got, want, 1e-5, "params after a microbatched step")


def test_nonfinite_step_is_skipped_and_counted(golden, mesh):
    cfg, params = golden
    step = make_train_step(_config(cfg), NextStep(cfg), OPTIMIZER, mesh)
    state = init_train_state(cfg, OPTIMIZER, mesh, params=params)
    bad = _token_batch(cfg)
    bad["image_tokens"][0, 4, 0] = np.nan
    before = _copy(state)
    state, metrics = step(state, bad)
    assert float(metrics["nonfinite"]) == 1.0 and float(metrics["skipped"]) == 1.0
    assert int(state.step) == 1 and int(state.skipped) == 1
    for got, want in zip(jax.tree.leaves((state.params, state.opt_state)),
                         jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(np.asarray(got), want)
    state, metrics = step(state, _token_batch(cfg))
    assert float(metrics["nonfinite"]) == 0.0 and int(state.skipped) == 1 and int(state.step) == 2


def test_state_is_donated_and_options_are_checked(golden, mesh):
    cfg, params = golden
    state = init_train_state(cfg, OPTIMIZER, mesh, params=params)
    old = jax.tree.leaves(state.params)[0]
    make_train_step(_config(cfg), NextStep(cfg), OPTIMIZER, mesh)(state, _token_batch(cfg))
    assert old.is_deleted()
    with pytest.raises(ValueError, match="train_step.nonfinite='bogus'"):
        make_train_step(_config(cfg, nonfinite="bogus"), NextStep(cfg), OPTIMIZER, mesh)


def test_pixel_batch_from_the_pipeline_encodes_in_the_step(golden, golden_dir, mesh):
    cfg, params = golden
    vae_cfg, vae_params = load_vae(golden_dir / "vae")
    vae_cfg = replace(vae_cfg, deterministic=True)  # the same tokens outside the step, no posterior noise
    vae = AutoencoderKL(vae_cfg)
    tokenizer = load_tokenizer(golden_dir / "tokenizer")
    data = DataConfig(seq_len=96, batch_size=2, image_size=64, image_input="pixels", shard_index=0, shard_count=1)
    batch = next(make_iterator(data, [DatasetSpec("shapes", num_samples=16)], tokenizer))
    assert (batch["image_slots"] >= 0).any()

    # Outside the step: encode every image slot, patchify, place each row's tokens at its slots.
    b, k = batch["images"].shape[:2]
    mean, _ = vae.apply({"params": vae_params}, jnp.asarray(batch["images"].reshape(b * k, 64, 64, 3)),
                        method=AutoencoderKL.encode)
    tokens = np.asarray(patchify(to_model_latents(mean, vae_cfg), cfg.latent_patch_size)).reshape(b, -1, token_dim(cfg))
    placed = np.zeros(batch["input_ids"].shape + (token_dim(cfg),), np.float32)
    for row in range(b):
        where = np.flatnonzero(batch["image_slots"][row] >= 0)
        placed[row, where] = tokens[row, batch["image_slots"][row, where]]
    token_batch = {key: v for key, v in batch.items() if key not in ("images", "image_slots")}
    token_batch["image_tokens"] = placed

    model = NextStep(cfg)
    with_pixels = make_train_step(_config(cfg), model, OPTIMIZER, mesh, vae=vae)
    with_tokens = make_train_step(_config(cfg), model, OPTIMIZER, mesh)
    _, m_pixels = with_pixels(init_train_state(cfg, OPTIMIZER, mesh, params=params), batch, vae_params)
    _, m_tokens = with_tokens(init_train_state(cfg, OPTIMIZER, mesh, params=params), token_batch)
    assert float(m_pixels["image_tokens"]) > 0 and float(m_pixels["lm_tokens"]) > 0
    for name in ("loss", "lm_loss", "im_loss", "grad_norm"):
        assert float(m_pixels[name]) == pytest.approx(float(m_tokens[name]), rel=1e-5), name


def test_optimizer_moments_follow_their_parameters(golden, mesh):
    cfg, _ = golden
    boxed = abstract_variables(cfg)
    params = nn.unbox(boxed)["params"]
    shardings = shardings_of(boxed, mesh)["params"]
    # A masked, chained AdamW: the moments sit deep inside, with masked-out leaves missing.
    no_bias = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", p)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adam(1e-3), no_bias))
    opt_state = jax.eval_shape(tx.init, params)
    out = follow_params(opt_state, params, shardings, mesh)
    q_spec = shardings["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"].spec
    mu = out[1].inner_state[0].mu
    assert mu["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"].spec == q_spec == P(None, "fsdp", "tensor", None)
    assert out[1].inner_state[0].count.spec == P()
