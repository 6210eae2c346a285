"""flax_view must be mapping.to_flax without the copy, for every tensor of both tables."""

import numpy as np
import pytest

from nextstep_jax.checkpoint import read_model_config, read_vae_config
from nextstep_jax.checkpoint.converted.tiled_copy import tiled_copy
from nextstep_jax.checkpoint.mapping import flax_view, nextstep_table, to_flax, to_torch, vae_table


@pytest.mark.parametrize("kind", ["nextstep", "vae"])
def test_flax_view_is_to_flax_without_a_copy(golden_dir, kind):
    cfg = read_model_config(golden_dir / "model") if kind == "nextstep" else read_vae_config(golden_dir / "vae")
    table = nextstep_table(cfg) if kind == "nextstep" else vae_table(cfg)
    assert {e.kind for e in table} == ({"copy", "linear"} if kind == "nextstep" else {"copy", "conv"})
    rng = np.random.default_rng(0)
    for entry in table:
        torch_array = rng.standard_normal(entry.torch_shape).astype(np.float32)
        view = flax_view(entry, torch_array)
        assert np.shares_memory(view, torch_array) or view.size == 0, entry.torch_key
        np.testing.assert_array_equal(view, to_flax(entry, torch_array), err_msg=entry.torch_key)
        out = np.empty(entry.torch_shape, np.float32)  # writing through the view gives the release layout
        tiled_copy(flax_view(entry, out), to_flax(entry, torch_array))
        np.testing.assert_array_equal(out, to_torch(entry, to_flax(entry, torch_array)), err_msg=entry.torch_key)


def test_flax_view_rejects_a_wrong_shape(golden_dir):
    entry = nextstep_table(read_model_config(golden_dir / "model"))[1]
    with pytest.raises(ValueError, match=entry.torch_key):
        flax_view(entry, np.zeros((3, 3), np.float32))
