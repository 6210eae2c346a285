"""tiled_copy must be a plain (casting) assignment whatever the strides."""

import ml_dtypes
import numpy as np
import pytest

from nextstep_jax.checkpoint.converted.tiled_copy import tiled_copy


@pytest.mark.parametrize("shape,axes", [((600, 300), (1, 0)), ((300, 7, 520), (2, 0, 1)), ((5, 3, 260, 4), (3, 2, 0, 1))])
def test_tiled_copy_matches_assignment_for_any_strides(shape, axes):
    src = np.random.default_rng(1).standard_normal(shape).astype(np.float32).transpose(axes)
    dst = np.empty(src.shape, ml_dtypes.bfloat16)
    tiled_copy(dst, src)
    np.testing.assert_array_equal(dst, src.astype(ml_dtypes.bfloat16))
    back = np.empty(shape, np.float32).transpose(axes)
    tiled_copy(back, src)
    np.testing.assert_array_equal(back, src)
