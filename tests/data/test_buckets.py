import pytest

from nextstep_jax.data.buckets import BASE_GRIDS, bucket_grids, nearest_grid


def test_official_grids_at_256_and_512():
    assert bucket_grids(256, True) == BASE_GRIDS
    assert len(BASE_GRIDS) == 17 and all(240 <= h * w <= 256 for h, w in BASE_GRIDS)
    assert bucket_grids(512, True) == tuple((2 * h, 2 * w) for h, w in BASE_GRIDS)
    assert bucket_grids(256, False) == ((16, 16),)
    assert bucket_grids(64, False) == ((4, 4),)


def test_scaled_grids_are_rounded_and_unique():
    grids = bucket_grids(64, True)  # scale 1/4: (10, 25) -> (2.5, 6.25) -> (3, 6); (14, 18) -> (4, 5)
    assert grids == ((2, 8), (2, 7), (3, 6), (3, 5), (4, 5), (4, 4), (5, 4), (5, 3), (6, 3), (7, 2), (8, 2))
    assert len(set(grids)) == len(grids)


@pytest.mark.parametrize("size", [0, 8, 250, -16])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_grids(size, True)


@pytest.mark.parametrize("height,width,expected", [
    (1000, 1000, (16, 16)),
    (256, 1024, (8, 32)),
    (100, 10000, (8, 32)),  # beyond the widest bucket
    (10000, 100, (32, 8)),
    (600, 900, (13, 19)),  # 0.667: 13/19 = 0.684 beats 12/21 = 0.571 and 14/18 = 0.778
    (900, 600, (19, 13)),
])
def test_nearest_grid(height, width, expected):
    assert nearest_grid(height, width, BASE_GRIDS) == expected
