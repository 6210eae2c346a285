import json
from pathlib import Path

import pytest

from conftest import repo_config
from nextstep_jax.configs import ConfigError, apply_overrides, load_config_file, model_config, with_tokenizer_ids
from nextstep_jax.data.pipeline import DataConfig, batch_spec, dataset_specs, make_iterator
from nextstep_jax.data.tokenizer import load_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_released_14b_values():
    cfg = repo_config("14b").model
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (5120, 48, 40, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.fm_head_dim, cfg.fm_head_layers) == (13824, 152064, 1536, 12)
    assert (cfg.boi, cfg.eoi, cfg.image_placeholder_id, cfg.pad_token_id) == (151667, 151668, 151669, 151665)
    assert cfg.attention_bias and not cfg.o_attention_bias and not cfg.tie_word_embeddings


def test_model_config_overrides():
    assert model_config(num_layers=3).num_layers == 3


def test_tiny_config_takes_its_special_ids_from_the_tokenizer_it_names(golden_dir):
    config = repo_config("tiny")
    special = load_tokenizer(config.data.tokenizer).special
    assert (config.model.boi, config.model.eoi, config.model.image_placeholder_id) == (
        special.boi, special.eoi, special.placeholder)
    assert (config.model.pad_token_id, config.model.bos_token_id, config.model.eos_token_id) == (
        special.pad, special.eos, special.eos)
    # Another tokenizer brings its own ids: the golden one's are those the official code recorded.
    meta = json.loads((golden_dir / "meta.json").read_text())
    golden = meta["special_token_ids"]
    unresolved = load_config_file(CONFIGS / "tiny.py")
    other = with_tokenizer_ids(apply_overrides(unresolved, [f"data.tokenizer={golden_dir / 'tokenizer'}",
                                                            f"model.vocab_size={meta['model_config']['vocab_size']}"]))
    assert (other.model.boi, other.model.eoi, other.model.image_placeholder_id, other.model.pad_token_id) == (
        golden["<|begin_of_image|>"], golden["<|end_of_image|>"], golden["<|image_placeholder|>"], golden["[PAD]"])
    assert other.model.eos_token_id == golden["<|endoftext|>"]


def test_tokenizer_ids_must_agree_with_ids_already_set(golden_dir):
    config = repo_config("tiny")  # ids now set from the byte-level tokenizer
    with pytest.raises(ConfigError, match=r"model\.\w+=\d+ but tokenizer"):
        with_tokenizer_ids(apply_overrides(config, [f"data.tokenizer={golden_dir / 'tokenizer'}"]))
    small = apply_overrides(config, ["model.vocab_size=100"])
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        with_tokenizer_ids(small)
    with pytest.raises(ConfigError, match="data.tokenizer=/nonexistent"):
        with_tokenizer_ids(apply_overrides(config, ["data.tokenizer=/nonexistent"]))
    assert with_tokenizer_ids(repo_config("14b")).model.boi == 151667  # no tokenizer named: the model's ids


@pytest.mark.parametrize("name", ["14b", "tiny"])
def test_repo_configs_derive_their_data_config(name):
    config = repo_config(name)
    data = DataConfig.from_config(config, process_index=0, process_count=1)
    assert (data.patch_size, data.latent_channels) == (config.model.latent_patch_size, config.model.latent_channels)
    assert (data.seq_len, data.batch_size, data.image_size) == (
        config.data.seq_len, config.data.batch_size, config.data.image_size)


@pytest.mark.parametrize("name", ["14b", "tiny"])
def test_repo_configs_hold_every_section(name):
    assert {"model", "vae", "data", "sampling", "mesh"} <= set(repo_config(name).keys())


def test_tiny_config_packs_shapes_batches_for_its_model():
    config = repo_config("tiny")
    data = DataConfig.from_config(config, process_index=0, process_count=1)
    tokenizer = load_tokenizer(config.data.tokenizer)
    batch = next(make_iterator(data, dataset_specs(config), tokenizer))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_spec(data)
    assert batch["input_ids"].max() < config.model.vocab_size
    assert (batch["input_ids"] == config.model.image_placeholder_id).sum() == (batch["image_slots"] >= 0).sum()
