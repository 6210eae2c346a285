"""The conversion benchmark's size handling (the measurement itself is not a test)."""

from __future__ import annotations

import math

import pytest

from nextstep_jax.bench.convert import _tensor_bytes, main, num_layers_for


def _bytes(num_layers: int) -> int:
    return sum(4 * math.prod(shape) for _, shape in _tensor_bytes(num_layers))


def test_the_release_closest_to_the_size_is_built():
    for layers in (1, 2, 12):
        assert num_layers_for(_bytes(layers)) == layers
    per_layer = _bytes(2) - _bytes(1)
    assert num_layers_for(_bytes(5) + 0.4 * per_layer) == 5 and num_layers_for(_bytes(5) + 0.6 * per_layer) == 6


@pytest.mark.parametrize("size", ["0.05", "0", "-1", "nan"])
def test_a_size_below_the_smallest_release_exits_2_before_writing(size, tmp_path, capsys):
    assert main(["--size-gb", size, "--workdir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: --size-gb {float(size):g}:") and len(err.strip().splitlines()) == 1
    assert f"{_bytes(1) / 1e9:.2f} GB" in err and list(tmp_path.iterdir()) == []
