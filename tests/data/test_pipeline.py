import json

import ml_collections
import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from grain.checkpoint import CheckpointHandler

from nextstep_jax.configs import data_config, model_config, vae_config
from nextstep_jax.data.pipeline import (DataConfig, DatasetSpec, batch_spec, dataset_specs, image_slots,
                                        image_targets_per_row, make_documents, make_iterator)
from nextstep_jax.data.records import FORMAT, RecordWriter, encode_record
from nextstep_jax.data.samples import SKIP_REASONS, EncodedImage, Sample
from nextstep_jax.data.scorer import score

SMALL = dict(seq_len=192, batch_size=2, image_size=32, max_images_per_row=4, shard_index=0, shard_count=1)


def _text_records(path, prefix: str, n: int):
    with RecordWriter(path) as writer:
        for i in range(n):
            writer.write(Sample(f"{prefix}{i}", "text", (f"{prefix} document {i}",)))
    return str(path)


def _keys(config: DataConfig, specs, tokenizer, limit: int | None = None) -> list[str]:
    keys = []
    for element in make_documents(config, specs, tokenizer):
        keys.append(element.key)
        if limit is not None and len(keys) == limit:
            break
    return keys


def test_batches_match_the_spec_and_each_image_matches_its_caption(tokenizer):
    config = DataConfig(**SMALL, caption_dropout=0.3)
    it = make_iterator(config, [DatasetSpec("shapes")], tokenizer)
    sp = tokenizer.special
    spec = batch_spec(config)
    checked = 0
    for _ in range(4):
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
        for b in range(config.batch_size):
            for segment in range(1, batch["segment_ids"][b].max() + 1):
                span = batch["segment_ids"][b] == segment
                ids = batch["input_ids"][b][span]
                area, eoi = (int(np.flatnonzero(ids == t)[0]) for t in (sp.image_area, sp.eoi))
                caption = tokenizer.decode(np.concatenate([ids[:area], ids[eoi + 1:-1]]))  # drop block, EOS
                slot = batch["image_slots"][b][span & (batch["input_ids"][b] == sp.placeholder)][0]
                image = batch["images"][b, slot // 4]
                pixels = np.round((image + 1) * 127.5).astype(np.uint8)
                assert score(pixels, caption), caption
                checked += 1
    assert checked >= 16
    metrics = it.metrics()
    assert metrics["data/documents"] == checked and 0 <= metrics["data/pad_fraction"] < 1


def _assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _restore_check(config: DataConfig, tokenizer, tmp_path=None):
    specs = [DatasetSpec("shapes")]
    it = make_iterator(config, specs, tokenizer)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    metrics = it.metrics()
    if tmp_path is not None:  # the Orbax handler grain registers for iterators
        CheckpointHandler().save(epath.Path(tmp_path), item=it)
    expected = [next(it) for _ in range(3)]
    it.close()
    restored = make_iterator(config, specs, tokenizer)
    if tmp_path is not None:
        CheckpointHandler().restore(epath.Path(tmp_path), item=restored)
    else:
        restored.set_state(state)
    assert restored.metrics() == metrics
    _assert_same_batches([next(restored) for _ in range(3)], expected)
    restored.close()


def test_restore_resumes_exactly(tokenizer, tmp_path):
    _restore_check(DataConfig(**SMALL), tokenizer, tmp_path)


def test_restore_resumes_exactly_with_worker_processes(tokenizer):
    flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    _restore_check(DataConfig(**(SMALL | dict(num_workers=2))), tokenizer)


def test_process_shards_are_disjoint_and_cover_the_dataset(tokenizer, tmp_path):
    records = _text_records(tmp_path / "t", "doc", 11)
    shards = []
    for index in range(2):
        config = DataConfig(**(SMALL | dict(shard_index=index, shard_count=2, num_epochs=1)))
        shards.append(_keys(config, [DatasetSpec(records)], tokenizer))
    assert sorted(map(len, shards)) == [5, 6]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == {f"doc{i}" for i in range(11)}
    # Later epochs reshuffle within the same shard.
    two_epochs = _keys(DataConfig(**(SMALL | dict(shard_index=1, shard_count=2, num_epochs=2))),
                       [DatasetSpec(records)], tokenizer)
    assert set(two_epochs) == set(shards[1]) and two_epochs[5:] != two_epochs[:5]


def test_mixing_follows_the_weights(tokenizer, tmp_path):
    a = _text_records(tmp_path / "a", "a", 20)
    b = _text_records(tmp_path / "b", "b", 20)
    keys = _keys(DataConfig(**SMALL), [DatasetSpec(a, weight=3), DatasetSpec(b, weight=1)], tokenizer, limit=400)
    assert sum(k.startswith("a") for k in keys) == 300


def _write_raw_records(path, blobs: list[bytes]) -> str:
    path.mkdir()
    writer = ArrayRecordWriter(str(path / "records-00000.array_record"), "group_size:1")
    for blob in blobs:
        writer.write(blob)
    writer.close()
    meta = {"format": FORMAT, "num_records": len(blobs),
            "shards": [{"file": "records-00000.array_record", "num_records": len(blobs)}]}
    (path / "meta.json").write_text(json.dumps(meta))
    return str(path)


def test_bad_samples_are_skipped_and_counted(tokenizer, images, tmp_path):
    good = EncodedImage(images.png(images.gradient(32, 32)))
    samples = [
        Sample("good0", "t2i", ("a red circle", good)),
        Sample("good1", "t2i", ("a blue square", good)),
        Sample("truncated", "t2i", ("x", EncodedImage(images.truncated_jpeg()))),
        Sample("empty", "t2i", ("x", EncodedImage(b""))),
        Sample("bomb", "t2i", ("x", EncodedImage(images.bomb_png(70000, 70000)))),
        Sample("mode", "t2i", ("x", EncodedImage(images.png16()))),
        Sample("nocaption", "t2i", ("", good)),
        Sample("longimage", "t2i", ("word " * 300, good)),
        Sample("longtext", "text", ("word " * 300,)),
        Sample("twoimages", "t2i", ("x", good, good)),
    ]
    damaged = images.damaged_near_start()
    samples += [Sample(name, "t2i", ("x", EncodedImage(data))) for name, data in damaged.items()]
    records = _write_raw_records(tmp_path / "bad", [encode_record(s) for s in samples] + [b"not a record"])
    config = DataConfig(**(SMALL | dict(num_epochs=1)))
    it = make_iterator(config, [DatasetSpec(records)], tokenizer)
    batches = list(it)
    metrics = it.metrics()
    expected = {"truncated": 1, "documents": 3, "skipped/decode_error": 1 + len(damaged), "skipped/empty_file": 1,
                "skipped/decompression_bomb": 1, "skipped/unsupported_mode": 1, "skipped/missing_caption": 1,
                "skipped/too_long": 1, "skipped/bad_structure": 1, "skipped/bad_record": 1}
    for reason in SKIP_REASONS:
        assert metrics[f"data/skipped/{reason}"] == expected.get(f"skipped/{reason}", 0), reason
    assert metrics["data/documents"] == 3 and metrics["data/truncated"] == 1
    assert sum((b["segment_ids"].max(axis=1)).sum() for b in batches) == 3


def test_default_image_slots_never_bind():
    # A 64 px image is 16 placeholders + >= 3 block tokens (plus its area digits), so 256 // 19 bounds a row.
    assert image_slots(DataConfig(seq_len=256, image_size=64)) == 13
    assert image_slots(DataConfig(seq_len=256, image_size=64, max_images_per_row=2)) == 2


def test_image_targets_per_row_bounds_token_batches():
    assert image_targets_per_row(DataConfig(image_input="latents", image_size=64, max_images_per_row=3)) == 3 * 16
    assert image_targets_per_row(DataConfig(image_input="latents", image_size=64)) is None
    assert image_targets_per_row(DataConfig(image_size=64, max_images_per_row=3)) is None  # pixels bound themselves


def test_configuration_errors(tokenizer):
    with pytest.raises(ValueError, match="multi_aspect needs"):
        DataConfig(multi_aspect=True)
    with pytest.raises(ValueError, match="shard_index"):
        DataConfig(shard_index=1)
    with pytest.raises(ValueError, match="renders pixels"):
        make_iterator(DataConfig(**SMALL, image_input="latents"), [DatasetSpec("shapes")], tokenizer)
    with pytest.raises(ValueError, match="weights"):
        make_iterator(DataConfig(**SMALL), [DatasetSpec("shapes", weight=0)], tokenizer)


def test_default_sharding_follows_jax_processes(tokenizer):
    config = DataConfig(**{k: v for k, v in SMALL.items() if not k.startswith("shard")}, num_epochs=1)
    spec = [DatasetSpec("shapes", num_samples=7)]
    assert sorted(_keys(config, spec, tokenizer)) == sorted(f"shapes/train/0/{i}" for i in range(7))


def _whole_config(golden_dir, **data):
    """The golden model's and VAE's latent facts, data section from the defaults plus ``data``."""
    model = json.loads((golden_dir / "model" / "config.json").read_text())
    vae = json.loads((golden_dir / "vae" / "config.json").read_text())
    return ml_collections.ConfigDict(dict(
        model=model_config(latent_patch_size=model["latent_patch_size"], latent_channels=model["latent_channels"]),
        vae=vae_config(z_channels=vae["z_channels"], ch_mult=tuple(vae["ch_mult"])), data=data_config(**data)))


def test_data_config_from_the_whole_config(golden_dir, tokenizer):
    release = json.loads((golden_dir / "model" / "config.json").read_text())
    section = {k: v for k, v in SMALL.items() if not k.startswith("shard")} | dict(batch_size=6)
    config = _whole_config(golden_dir, **section, datasets=({"source": "shapes", "num_samples": 9},))
    got = DataConfig.from_config(config, process_index=2, process_count=3)
    assert (got.patch_size, got.latent_channels) == (release["latent_patch_size"], release["latent_channels"])
    assert got.batch_size == 2 and (got.shard_index, got.shard_count) == (2, 3)  # 6 global rows / 3 processes
    assert got == DataConfig(**(SMALL | dict(shard_index=2, shard_count=3, patch_size=release["latent_patch_size"],
                                             latent_channels=release["latent_channels"])))
    assert dataset_specs(config) == [DatasetSpec("shapes", num_samples=9)]
    single = DataConfig.from_config(config)  # the JAX processes: one here
    assert (single.batch_size, single.shard_index, single.shard_count) == (6, 0, 1)
    _assert_same_batches([next(make_iterator(single, dataset_specs(config), tokenizer))],
                         [next(make_iterator(DataConfig(**(SMALL | dict(batch_size=6))),
                                             [DatasetSpec("shapes", num_samples=9)], tokenizer))])


def test_data_config_from_config_errors(golden_dir):
    config = _whole_config(golden_dir, batch_size=6, datasets=({"source": "shapes", "size": 3},))
    with pytest.raises(ValueError, match=r"data.batch_size=6 .* 4 processes"):
        DataConfig.from_config(config, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"data.datasets\[0\]"):
        dataset_specs(config)
    wrong = ml_collections.ConfigDict(config.to_dict())
    wrong.vae.z_channels += 1
    with pytest.raises(ValueError, match="vae.z_channels"):
        DataConfig.from_config(wrong, process_index=0, process_count=1)
    wrong = ml_collections.ConfigDict(config.to_dict())
    wrong.vae.ch_mult = tuple(wrong.vae.ch_mult)[:-1]  # one halving less: 8 pixels per token
    with pytest.raises(ValueError, match="pixels per image token"):
        DataConfig.from_config(wrong, process_index=0, process_count=1)
