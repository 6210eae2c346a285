import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.data.images import decode_rgb, normalize, resize_center_crop
from nextstep_jax.data.samples import BadSample


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(BadSample) as e:
        decode_rgb(data, **kwargs)
    return e.value.reason


def test_lossless_rgb_and_gray(images):
    arr = images.gradient()
    np.testing.assert_array_equal(decode_rgb(images.png(arr)), arr)
    gray = arr[..., 0]
    np.testing.assert_array_equal(decode_rgb(images.png(gray)), np.repeat(gray[..., None], 3, -1))


def test_alpha_composited_on_white(images):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[0, :, 3] = 0  # fully transparent row -> white
    rgba[1, :, 3] = 255  # opaque row -> (200, 0, 0)
    rgba[2:, :, 3] = 128
    out = decode_rgb(images.png(rgba)).astype(np.float64)
    np.testing.assert_array_equal(out[0], 255)
    np.testing.assert_array_equal(out[1], [[200, 0, 0]] * 4)
    a = 128 / 255
    expected = np.array([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    np.testing.assert_allclose(out[2:], np.broadcast_to(expected, out[2:].shape), atol=1.0)
    la = np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1)
    np.testing.assert_array_equal(decode_rgb(images.png(la))[..., 0], [[255, 50], [50, 255]])


def test_palette_with_transparent_index_on_white(images):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 255] + [10, 20, 30] * 255)
    img.putdata([0, 1, 0])
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=1)
    np.testing.assert_array_equal(decode_rgb(buf.getvalue())[0], [[0, 0, 255], [255, 255, 255], [0, 0, 255]])


def test_cmyk_to_rgb():
    img = Image.new("CMYK", (2, 1))
    img.putdata([(0, 255, 255, 0), (0, 0, 0, 0)])  # pure cyan-free magenta+yellow = red, then white
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    np.testing.assert_array_equal(decode_rgb(buf.getvalue())[0], [[255, 0, 0], [255, 255, 255]])


def test_exif_orientation_applied(images):
    arr = images.gradient(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = decode_rgb(images.png(arr, exif=exif))
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))


def test_bad_images_are_rejected_with_reasons(images):
    assert _reason(b"") == "empty_file"
    assert _reason(images.truncated_jpeg()) == "decode_error"
    assert _reason(images.jpeg()[:100]) == "decode_error"  # cut inside its header: Image.open itself fails
    assert _reason(b"this is not an image at all") == "decode_error"
    assert _reason(images.png16()) == "unsupported_mode"
    assert _reason(images.encode(np.zeros((4, 4), np.float32), "TIFF")) == "unsupported_mode"
    assert _reason(images.encode(images.gradient(), "PPM")) == "unsupported_format"


def test_images_damaged_near_their_start_are_decode_errors(images):
    for name, data in images.damaged_near_start().items():
        assert _reason(data) == "decode_error", name


@pytest.mark.parametrize("maker", ["bomb_png", "bomb_jpeg"])
def test_decompression_bomb_rejected_without_allocating(images, maker):
    data = getattr(images, maker)(60000, 60000)  # 3.6 G pixels declared
    tracemalloc.start()
    try:
        assert _reason(data) == "decompression_bomb"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20
    # A modest limit applies to ordinary images as well.
    assert _reason(images.png(images.gradient(32, 48)), max_pixels=32 * 48 - 1) == "decompression_bomb"


def test_crop_without_resize_is_exact_centre_slice():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 80, 3), dtype=np.uint8)  # scale = max(32/32, 32/80) = 1
    np.testing.assert_array_equal(resize_center_crop(wide, 32, 32), wide[:, 24:56])
    tall = rng.integers(0, 256, (50, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(tall, 16, 16), tall[17:33])
    np.testing.assert_array_equal(resize_center_crop(wide, 32, 80), wide)


def test_resize_covers_target_then_crops():
    flat = np.full((10, 30, 3), 77, np.uint8)
    out = resize_center_crop(flat, 32, 48)  # scale 3.2: 96 x 32 then crop the middle 48 columns
    assert out.shape == (32, 48, 3)
    np.testing.assert_array_equal(out, 77)
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 255
    out = resize_center_crop(halves, 16, 16).astype(int)
    assert (out[:, :7] <= 2).all() and (out[:, 9:] >= 253).all()


def test_normalize_range():
    x = np.array([0, 255, 51], np.uint8)
    np.testing.assert_allclose(normalize(x), [-1.0, 1.0, 51 / 255 * 2 - 1], rtol=0, atol=1e-7)
    assert normalize(x).dtype == np.float32
