import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.latents import patchify, unpatchify


def _nchw_to_nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def test_patchify_matches_golden(load_case, golden_dir):
    import json
    p = json.loads((golden_dir / "model" / "config.json").read_text())["latent_patch_size"]
    case = load_case("a_patchify")
    for lat, tok in (("latent_sq", "tokens_sq"), ("latent_ns", "tokens_ns")):
        got = patchify(jnp.asarray(_nchw_to_nhwc(case[lat])), p)
        np.testing.assert_array_equal(np.asarray(got), case[tok])
        h, w = case[lat].shape[2] // p, case[lat].shape[3] // p
        back = unpatchify(got, h, w, p)
        np.testing.assert_array_equal(np.asarray(back), _nchw_to_nhwc(case[lat]))
    rand = jnp.asarray(case["rand_tokens"])
    for name in ("rand_unpatch_2x3", "rand_unpatch_3x2"):
        ref = case[name]
        got = unpatchify(rand, ref.shape[2] // p, ref.shape[3] // p, p)
        np.testing.assert_array_equal(np.asarray(got), _nchw_to_nhwc(ref))


@pytest.mark.parametrize("h,w,p,c", [(2, 3, 2, 16), (5, 1, 2, 4), (3, 4, 1, 8), (2, 2, 4, 3)])
def test_patchify_roundtrip_and_order_nonsquare(h, w, p, c):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, h * p, w * p, c)).astype(np.float32)
    tok = np.asarray(patchify(jnp.asarray(lat), p))
    # Independent element-wise definition of the token layout.
    for hi in range(h):
        for wi in range(w):
            for ch in range(c):
                for dy in range(p):
                    for dx in range(p):
                        assert tok[1, hi * w + wi, ch * p * p + dy * p + dx] == lat[1, hi * p + dy, wi * p + dx, ch]
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(tok), h, w, p)), lat)


def test_unpatchify_rejects_wrong_grid():
    with pytest.raises(ValueError, match="3x3"):
        unpatchify(jnp.zeros((1, 8, 64)), 3, 3, 2)
