"""VAE loss terms against float64 numpy references: reconstruction, KL, noise regularisation, LPIPS (from a
weight file in the documented format), the PatchGAN hinge terms; weight-file errors name file and key.

Array sizes follow the golden VAE case (h_vae: its image and latent shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.training import vae_losses as L
from nextstep_jax.training.patch_gan import PatchDiscriminator
from nextstep_jax.training.perceptual import (INPUT_SCALE, INPUT_SHIFT, PerceptualWeightsError, features,
                                              load_perceptual_weights, perceptual_loss)

REL = 1e-5


@pytest.fixture(scope="module")
def shapes(load_case):
    case = load_case("h_vae")
    _, c, h, w = case["img0_x"].shape
    _, z, lh, lw = case["img0_mean"].shape
    return {"image": (2, h, w, c), "latent": (2, lh, lw, z)}


def _rand(rng, shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def test_reconstruction_terms(shapes):
    rng = np.random.default_rng(0)
    x, y = _rand(rng, shapes["image"]), _rand(rng, shapes["image"])
    r = x.astype(np.float64) - y
    got = L.reconstruction_terms(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(float(got["l1"]), np.abs(r).mean(), rtol=REL)
    np.testing.assert_allclose(float(got["l2"]), (r * r).mean(), rtol=REL)


def test_kl_divergence(shapes):
    rng = np.random.default_rng(1)
    mean, logvar = _rand(rng, shapes["latent"]), _rand(rng, shapes["latent"], 2.0)
    m, lv = mean.astype(np.float64), logvar.astype(np.float64)
    want = np.mean(0.5 * (m**2 + np.exp(lv) - 1.0 - lv))
    np.testing.assert_allclose(float(L.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))), want, rtol=REL)
    assert float(L.kl_divergence(jnp.zeros(4), jnp.zeros(4))) == 0.0  # the prior itself


def test_latent_noise(shapes):
    b, *rest = shapes["latent"]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(b))
    alpha, eps = L.draw_latent_noise(keys, rest, 0.5)
    assert alpha.shape == (b,) and eps.shape == (b, *rest)
    assert np.all((np.asarray(alpha) >= 0) & (np.asarray(alpha) < 0.5))
    # Each image's draw depends on its own key only (so not on how the batch is split over devices).
    alone_alpha, alone_eps = L.draw_latent_noise(keys[1:2], rest, 0.5)
    np.testing.assert_array_equal(np.asarray(alone_eps[0]), np.asarray(eps[1]))
    assert float(alone_alpha[0]) == float(alpha[1])
    z = _rand(np.random.default_rng(2), shapes["latent"])
    want = z.astype(np.float64) + np.asarray(alpha, np.float64)[:, None, None, None] * np.asarray(eps, np.float64)
    np.testing.assert_allclose(np.asarray(L.add_latent_noise(jnp.asarray(z), alpha, eps)), want, rtol=REL, atol=1e-6)


def test_adversarial_terms():
    rng = np.random.default_rng(4)
    real, fake = _rand(rng, (2, 6, 6, 1), 2.0), _rand(rng, (2, 6, 6, 1), 2.0)
    r, f = real.astype(np.float64), fake.astype(np.float64)
    want = 0.5 * (np.maximum(1 - r, 0).mean() + np.maximum(1 + f, 0).mean())
    np.testing.assert_allclose(float(L.hinge_discriminator_loss(jnp.asarray(real), jnp.asarray(fake))), want, rtol=REL)
    np.testing.assert_allclose(float(L.generator_adversarial_loss(jnp.asarray(fake))), -f.mean(), rtol=REL)


def test_patch_discriminator_scores_each_image_alone(shapes):
    x = jnp.asarray(_rand(np.random.default_rng(5), shapes["image"]))
    disc = PatchDiscriminator(channels=16, layers=2)
    params = disc.init(jax.random.PRNGKey(0), x)
    logits = disc.apply(params, x)
    h, w = shapes["image"][1:3]
    # Two stride-2 4x4 convs, then two stride-1 4x4 convs with padding 1 (each shrinks the side by 1).
    assert logits.shape == (2, h // 4 - 2, w // 4 - 2, 1)
    np.testing.assert_allclose(np.asarray(disc.apply(params, x[1:])), np.asarray(logits[1:]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- perceptual (LPIPS)

STAGES = ((0, 2), (5, 7))  # two VGG-style stages: conv, ReLU, conv, ReLU | pool | conv, ReLU, conv, ReLU
WIDTHS = (4, 6)


def _weight_file(tmp_path, rng, lin=True, drop=None, reshape=None):
    tensors, c_in = {}, 3
    for stage, width in zip(STAGES, WIDTHS):
        for i in stage:
            tensors[f"features.{i}.weight"] = _rand(rng, (width, c_in, 3, 3), 0.4)
            tensors[f"features.{i}.bias"] = _rand(rng, (width,), 0.1)
            c_in = width
    if lin:
        for k, width in enumerate(WIDTHS):
            tensors[f"lin{k}.model.1.weight"] = np.abs(_rand(rng, (1, width, 1, 1)))
    tensors["unrelated.weight"] = np.zeros(3, np.float32)  # other keys are ignored
    if drop:
        del tensors[drop]
    if reshape:
        key, shape = reshape
        tensors[key] = np.zeros(shape, np.float32)
    path = tmp_path / "vgg.npz"
    np.savez(path, **tensors)
    return path, tensors


def _np_conv3x3(x, w, b):
    """x [N, H, W, I] (float64), torch weight [O, I, 3, 3], zero padding 1."""
    n, h, wd, _ = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwi,oi->nhwo", p[:, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
    return out + b


def _np_lpips(tensors, a, b, lin=True):
    def taps(x):
        h = (x.astype(np.float64) - np.asarray(INPUT_SHIFT)) / np.asarray(INPUT_SCALE)
        out = []
        for s, stage in enumerate(STAGES):
            if s:
                n, hh, ww, c = h.shape
                h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
            for i in stage:
                h = np.maximum(_np_conv3x3(h, tensors[f"features.{i}.weight"].astype(np.float64),
                                           tensors[f"features.{i}.bias"].astype(np.float64)), 0)
            out.append(h)
        return out

    total = 0.0
    for k, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        w = tensors[f"lin{k}.model.1.weight"].reshape(-1).astype(np.float64) if lin else 1.0
        total = total + (((na - nb) ** 2) * w).sum(-1).mean(axis=(1, 2))
    return total


@pytest.mark.parametrize("lin", [True, False])
def test_perceptual_loss_matches_numpy(tmp_path, shapes, lin):
    rng = np.random.default_rng(6)
    path, tensors = _weight_file(tmp_path, rng, lin=lin)
    net = load_perceptual_weights(path)
    assert net.stage_sizes == (2, 2) and (net.lin is not None) == lin
    a = np.tanh(_rand(rng, shapes["image"]))
    b = np.clip(a + _rand(rng, shapes["image"], 0.3), -1, 1)
    want = _np_lpips(tensors, a, b, lin)
    with jax.default_matmul_precision("highest"):
        got = float(perceptual_loss(net, jnp.asarray(a), jnp.asarray(b)))
        assert [f.shape[-1] for f in features(net, jnp.asarray(a))] == list(WIDTHS)
        assert float(perceptual_loss(net, jnp.asarray(a), jnp.asarray(a))) == 0.0
    np.testing.assert_allclose(got, want.mean(), rtol=1e-4)


def test_lpips_distance_matches_numpy(shapes):
    rng = np.random.default_rng(7)
    fa = [_rand(rng, (2, 8, 8, 5)), _rand(rng, (2, 4, 4, 3))]
    fb = [_rand(rng, (2, 8, 8, 5)), _rand(rng, (2, 4, 4, 3))]
    lin = [np.abs(_rand(rng, (5,))), np.abs(_rand(rng, (3,)))]
    unit = lambda f: f / (np.sqrt((f**2).sum(-1, keepdims=True)) + 1e-10)
    want = 0.0
    for a, b, w in zip(fa, fb, lin):
        d = (unit(a.astype(np.float64)) - unit(b.astype(np.float64))) ** 2
        want = want + (d * w).sum(-1).mean(axis=(1, 2))
    got = L.lpips_distance([jnp.asarray(x) for x in fa], [jnp.asarray(x) for x in fb], [jnp.asarray(w) for w in lin])
    np.testing.assert_allclose(np.asarray(got), want, rtol=REL)


@pytest.mark.parametrize("change,message", [
    (dict(drop="features.7.bias"), "features.7 needs both"),
    (dict(reshape=("features.5.weight", (6, 5, 3, 3))), "features.5.weight"),
    (dict(drop="lin1.model.1.weight"), "lin1.model.1.weight is missing"),
    (dict(reshape=("lin0.model.1.weight", (1, 3, 1, 1))), "lin0.model.1.weight is shape"),
])
def test_bad_weight_files_name_the_key(tmp_path, change, message):
    path, _ = _weight_file(tmp_path, np.random.default_rng(8), **change)
    with pytest.raises(PerceptualWeightsError, match=message) as e:
        load_perceptual_weights(path)
    assert str(path) in str(e.value)


def test_missing_weight_file(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="expected an existing"):
        load_perceptual_weights(tmp_path / "vgg.pth")
