import json

import jax.numpy as jnp
import numpy as np
import pytest

import image_makers
from nextstep_jax.checkpoint.conversion import import_release
from nextstep_jax.data.images import decode_rgb, normalize, resize_center_crop
from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_iterator
from nextstep_jax.data.records import RecordWriter
from nextstep_jax.data.samples import EncodedImage, LatentImage, Sample
from nextstep_jax.data.sources import RecordSource
from nextstep_jax.data.tokenizer import load_tokenizer
from nextstep_jax.encode_latents import encode_records, main, sharded_encoder, vae_encode_fn
from nextstep_jax.latents import patchify

PROJ = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)


@pytest.fixture
def images():
    return image_makers


@pytest.fixture
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir / "tokenizer")


def fake_encode(params, images):
    """A stand-in VAE: 8x8 average pool, then a fixed 3 -> 16 channel map."""
    n, h, w, c = images.shape
    pooled = images.reshape(n, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))
    return pooled @ params["proj"]


def _reference_latent(data: bytes, height: int, width: int) -> np.ndarray:
    px = normalize(resize_center_crop(decode_rgb(data), height, width)).astype(np.float64)
    pooled = px.reshape(height // 8, 8, width // 8, 8, 3).mean(axis=(1, 3))
    return pooled @ PROJ.astype(np.float64)


@pytest.fixture
def pixel_records(tmp_path, images):
    square, wide, tall = images.png(images.gradient(64, 64)), images.jpeg(images.gradient(64, 128)), \
        images.png(images.gradient(100, 40))
    samples = [Sample("sq", "t2i", ("square", EncodedImage(square))),
               Sample("txt", "text", ("no image here",)),
               Sample("edit", "edit", (EncodedImage(wide), "widen", EncodedImage(square))),
               Sample("tall", "t2i", ("tall", EncodedImage(tall)))]
    samples += [Sample(f"sq{i}", "t2i", (f"square {i}", EncodedImage(square))) for i in range(4)]
    with RecordWriter(tmp_path / "pixels") as writer:
        for s in samples:
            writer.write(s)
    return tmp_path / "pixels", {"square": square, "wide": wide, "tall": tall}


def test_encode_records_with_an_injected_encoder(pixel_records, tmp_path):
    records, data = pixel_records
    run, batch_size = sharded_encoder(fake_encode, {"proj": jnp.asarray(PROJ)}, batch_size=3)
    summary = encode_records(records, tmp_path / "latents", run, batch_size, image_size=64, multi_aspect=True,
                             latent_dtype="float16", progress=False)
    assert summary == {"written": 8, "skipped": 0, "skipped_by_reason": {}}
    out = RecordSource(tmp_path / "latents")
    assert [out[i].key for i in range(len(out))] == ["sq", "txt", "edit", "tall"] + [f"sq{i}" for i in range(4)]
    assert out[1].segments == ("no image here",)
    # Buckets at 64 px: square -> 4x4 tokens (64x64 px); 64x128 -> 3x6 (48x96 px); 100x40 -> 6x3 (96x48 px).
    expected = {"square": (64, 64), "wide": (48, 96), "tall": (96, 48)}
    for index, names in ((0, ["square"]), (2, ["wide", "square"]), (3, ["tall"])):
        latents = [s.latent for s in out[index].segments if isinstance(s, LatentImage)]
        assert len(latents) == len(names)
        for latent, name in zip(latents, names):
            h, w = expected[name]
            assert latent.dtype == np.float16 and latent.shape == (h // 8, w // 8, 16)
            np.testing.assert_allclose(latent, _reference_latent(data[name], h, w), atol=2e-3, rtol=2e-3)
    assert out[2].segments[1] == "widen"


def _text_outside_image_blocks(ids: np.ndarray, special) -> list[int]:
    keep, inside = [], False
    for t in ids.tolist():
        inside = inside or t == special.image_area
        if not inside and t != special.eos:
            keep.append(t)
        inside = inside and t != special.eoi
    return keep


def test_latent_records_feed_the_pipeline(pixel_records, tmp_path, tokenizer):
    records, _ = pixel_records
    run, batch_size = sharded_encoder(fake_encode, {"proj": jnp.asarray(PROJ)}, batch_size=4)
    encode_records(records, tmp_path / "latents", run, batch_size, image_size=64, multi_aspect=True, progress=False)
    source = RecordSource(tmp_path / "latents")
    expected_tokens = {
        s.texts[0]: np.concatenate([patchify(x.latent[None], 2)[0] for x in s.segments if isinstance(x, LatentImage)])
        for s in (source[i] for i in range(len(source))) if s.kind != "text"}
    config = DataConfig(seq_len=128, batch_size=2, image_input="latents", image_size=64, multi_aspect=True,
                        caption_dropout=0.0, edit_dropout=0.0, num_epochs=1, shard_index=0, shard_count=1)
    sp = tokenizer.special
    seen, decoded = [], []
    for batch in make_iterator(config, [DatasetSpec(str(tmp_path / "latents"))], tokenizer):
        assert batch["image_tokens"].shape == (2, 128, 64)
        for b in range(2):
            for segment in range(1, batch["segment_ids"][b].max() + 1):
                span = batch["segment_ids"][b] == segment
                ids = batch["input_ids"][b][span]
                decoded.append(tokenizer.decode(ids))
                text = tokenizer.decode(_text_outside_image_blocks(ids, sp))
                if text in expected_tokens:
                    np.testing.assert_array_equal(batch["image_tokens"][b][span][ids == sp.placeholder],
                                                  expected_tokens[text])
                    seen.append(text)
    assert sorted(seen) == sorted(expected_tokens)
    assert any("<|image_area|>3*6<|begin_of_image|>" in d for d in decoded)  # the wide image's bucket


def test_real_vae_encoder_matches_golden(load_case, golden_dir):
    """The wiring to models/vae.py: model-space latents of the official VAE (golden case h)."""
    encode, params = vae_encode_fn(golden_dir / "vae")
    run, batch_size = sharded_encoder(encode, params, batch_size=1)
    case = load_case("h_vae")
    for name in ("img0", "img1"):
        got = run(np.transpose(case[f"{name}_x"], (0, 2, 3, 1)))
        expected = np.transpose(case[f"{name}_norm_latent"], (0, 2, 3, 1))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vae_format", ["release", "converted"])
def test_cli_with_the_golden_vae(tmp_path, images, capsys, golden_dir, vae_format):
    pixels = images.gradient(64, 64)
    with RecordWriter(tmp_path / "in") as writer:
        writer.write(Sample("only", "t2i", ("gradient", EncodedImage(images.png(pixels)))))
    vae = golden_dir / "vae"
    if vae_format == "converted":
        import_release(vae, tmp_path / "vae", progress=False)
        vae = tmp_path / "vae"
    assert main(["--records", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vae", str(vae),
                 "--image-size", "64", "--batch-size", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "written": 1, "skipped": 0, "skipped_by_reason": {}}
    latent = RecordSource(tmp_path / "out")[0].segments[1].latent
    encode, params = vae_encode_fn(golden_dir / "vae")
    run, _ = sharded_encoder(encode, params, batch_size=1)
    np.testing.assert_allclose(latent, run(normalize(pixels)[None])[0], atol=1e-6)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(pixel_records, tmp_path, capsys, golden_dir):
    records, _ = pixel_records
    common = ["--out", str(tmp_path / "out"), "--no-progress"]
    for argv, culprit in (
            (["--records", str(tmp_path / "none"), "--vae", str(golden_dir / "vae")], str(tmp_path / "none")),
            (["--records", str(records), "--vae", str(tmp_path)], str(tmp_path)),
            (["--records", str(records), "--vae", str(golden_dir / "vae"), "--image-size", "50"], "image_size 50"),
            (["--records", str(records), "--vae", str(golden_dir / "vae"), "--image-size", "72"], "image_size 72"),
            (["--records", str(records), "--vae", str(golden_dir / "vae"), "--config.data.image_size=big"],
             "data.image_size=big")):
        assert main(argv + common) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and culprit in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["--records", str(records), "--vae", str(golden_dir / "vae"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"{tmp_path / 'out'} is not empty" in err and len(err.splitlines()) == 1, err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
