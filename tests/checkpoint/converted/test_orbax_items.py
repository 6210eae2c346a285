"""Orbax items written block by block must be what Orbax itself reads, and what Orbax writes must be readable
block by block."""

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from nextstep_jax.checkpoint.converted.orbax_items import ItemReader, ItemWriter, blocks, chunk_shape, restore_item
from nextstep_jax.checkpoint.errors import CheckpointError


def _tree(rng):
    return {
        "dense": {"kernel": rng.standard_normal((48, 20)).astype(np.float32)},
        "stacked": rng.standard_normal((3, 8, 6)).astype(ml_dtypes.bfloat16),
        "zeros": np.zeros((5, 7), np.float32),  # every chunk equals the fill value and must still be stored
        "scalar": np.array(2.5, np.float32),
    }


def _write(directory, tree):
    writer = ItemWriter(directory)
    for path, array in traverse_util.flatten_dict(tree).items():
        stacked = path == ("stacked",)
        chunks = chunk_shape(array.shape, range(1 if stacked else 0, array.ndim), array.dtype.itemsize,
                             layer_axis=stacked, max_split=4)
        writer.create(path, array.shape, array.dtype, chunks)
        if stacked:
            for layer in range(array.shape[0]):  # one layer slice at a time, as an import does
                for box in blocks(array.shape[1:], chunks[1:], array.itemsize, max_bytes=32):
                    writer.write(path, (layer, *box), array[layer][box])
        else:
            for box in blocks(array.shape, chunks, array.itemsize, max_bytes=256):
                writer.write(path, box, array[box])
    writer.finish()


def test_orbax_restores_what_the_item_writer_writes(tmp_path):
    tree = _tree(np.random.default_rng(0))
    _write(tmp_path / "item", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
    with ocp.StandardCheckpointer() as checkpointer:  # Orbax's own API, not ours
        restored = checkpointer.restore((tmp_path / "item").absolute(), target)
    for path, array in traverse_util.flatten_dict(tree).items():
        got = traverse_util.flatten_dict(restored)[path]
        assert got.dtype == array.dtype and got.shape == array.shape, path
        assert np.asarray(got).tobytes() == array.tobytes(), path
    # restore_item casts on the way in when asked to
    target["dense"]["kernel"] = jax.ShapeDtypeStruct((48, 20), ml_dtypes.bfloat16, sharding=device)
    cast = restore_item(tmp_path / "item", target)["dense"]["kernel"]
    np.testing.assert_array_equal(np.asarray(cast), tree["dense"]["kernel"].astype(ml_dtypes.bfloat16))


def test_item_reader_reads_regions_of_an_orbax_saved_item(tmp_path):
    tree = _tree(np.random.default_rng(1))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "orbax").absolute(), tree)
    reader = ItemReader(tmp_path / "orbax")
    assert sorted(reader.paths) == sorted(traverse_util.flatten_dict(tree))
    assert reader.dtype(("stacked",)) == ml_dtypes.bfloat16 and reader.shape(("stacked",)) == (3, 8, 6)
    np.testing.assert_array_equal(reader.read(("stacked",), (1, slice(2, 5))), tree["stacked"][1, 2:5])
    np.testing.assert_array_equal(reader.read(("dense", "kernel")), tree["dense"]["kernel"])
    with pytest.raises(CheckpointError, match="no array missing"):
        reader.read(("missing",))


def test_chunks_split_sharded_axes_and_layers_and_cap_the_size():
    assert chunk_shape((48, 4096, 40, 128), [1, 2], 4, layer_axis=True) == (1, 512, 5, 128)
    assert chunk_shape((152064, 5120), [0, 1], 4) == (4752, 640)  # 8 x 8 split, then halved under 16 MiB
    assert chunk_shape((12, 5), [0, 1], 4) == (3, 5)  # largest power of two dividing the axis
    assert chunk_shape((1 << 16, 1 << 10), [], 4, max_bytes=1 << 20) == (512, 512)  # largest axis halved
    assert chunk_shape((), [], 4) == ()


@pytest.mark.parametrize("shape,chunks,max_bytes", [((10, 7), (3, 7), 4 * 7 * 6), ((4, 6, 8), (1, 3, 4), 4 * 100),
                                                     ((5,), (5,), 1), ((), (), 64)])
def test_blocks_tile_the_array_in_whole_chunks(shape, chunks, max_bytes):
    covered = np.zeros(shape, np.int32)
    for box in blocks(shape, chunks, 4, max_bytes):
        covered[box] += 1
        for s, size, chunk in zip(box, shape, chunks):
            assert s.start % chunk == 0 and (s.stop % chunk == 0 or s.stop == size)
        assert np.prod([s.stop - s.start for s in box]) * 4 <= max(max_bytes, 4 * np.prod(chunks))
    assert (covered == 1).all()
