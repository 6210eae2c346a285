"""flax_view must be mapping.to_flax without the copy, for every tensor of both tables; transfer must be a
plain (casting) assignment whatever the strides."""

import ml_dtypes
import numpy as np
import pytest

from nextstep_jax.checkpoint.layout import transfer
from nextstep_jax.checkpoint.load import load_nextstep, load_vae
from nextstep_jax.checkpoint.mapping import flax_view, nextstep_table, to_flax, to_torch, vae_table


@pytest.mark.parametrize("kind", ["nextstep", "vae"])
def test_flax_view_is_to_flax_without_a_copy(golden_dir, kind):
    cfg = load_nextstep(golden_dir / "model")[0] if kind == "nextstep" else load_vae(golden_dir / "vae")[0]
    table = nextstep_table(cfg) if kind == "nextstep" else vae_table(cfg)
    assert {e.kind for e in table} == ({"copy", "linear"} if kind == "nextstep" else {"copy", "conv"})
    rng = np.random.default_rng(0)
    for entry in table:
        torch_array = rng.standard_normal(entry.torch_shape).astype(np.float32)
        view = flax_view(entry, torch_array)
        assert np.shares_memory(view, torch_array) or view.size == 0, entry.torch_key
        np.testing.assert_array_equal(view, to_flax(entry, torch_array), err_msg=entry.torch_key)
        out = np.empty(entry.torch_shape, np.float32)  # writing through the view gives the release layout
        transfer(flax_view(entry, out), to_flax(entry, torch_array))
        np.testing.assert_array_equal(out, to_torch(entry, to_flax(entry, torch_array)), err_msg=entry.torch_key)


def test_flax_view_rejects_a_wrong_shape(golden_dir):
    entry = nextstep_table(load_nextstep(golden_dir / "model")[0])[1]
    with pytest.raises(ValueError, match=entry.torch_key):
        flax_view(entry, np.zeros((3, 3), np.float32))


@pytest.mark.parametrize("shape,axes", [((600, 300), (1, 0)), ((300, 7, 520), (2, 0, 1)), ((5, 3, 260, 4), (3, 2, 0, 1))])
def test_transfer_matches_assignment_for_any_strides(shape, axes):
    src = np.random.default_rng(1).standard_normal(shape).astype(np.float32).transpose(axes)
    dst = np.empty(src.shape, ml_dtypes.bfloat16)
    transfer(dst, src)
    np.testing.assert_array_equal(dst, src.astype(ml_dtypes.bfloat16))
    back = np.empty(shape, np.float32).transpose(axes)
    transfer(back, src)
    np.testing.assert_array_equal(back, src)
