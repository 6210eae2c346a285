"""Release config.json files read into our configs: both schemas, and loud refusals naming the field."""

import json

import pytest

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.release.config import (
    model_config_from_release,
    read_release_config,
    vae_config_from_release,
)


def test_release_config_1_0(golden_dir):
    release = json.loads((golden_dir / "model" / "config.json").read_text())
    cfg = model_config_from_release(golden_dir / "model" / "config.json")
    assert cfg.schema == "1.0"
    assert cfg.hidden_size == release["hidden_size"]
    assert cfg.num_layers == release["num_hidden_layers"]
    assert cfg.num_kv_heads == release["num_key_value_heads"]
    assert cfg.fm_head_dim == release["fm_head_dim"]
    assert cfg.fm_head_batch_mul == release["fm_head_batch_mul"]
    assert cfg.pad_token_id == release["pad_token_id_added"]
    assert cfg.rope_theta == release["rope_theta"]


def _as_1_1(release: dict) -> dict:
    """Rename the NextStep-1 fields to the NextStep-1.1 schema: the names and the extra fields below are those
    of the stepfun-ai/NextStep-1.1 release's config.json (Hugging Face Hub), which follows the config of the
    official training code (configs/*.py of stepfun-ai/NextStep-1)."""
    out = dict(release)
    for old, new in (("fm_head_dim", "genloss_width"), ("fm_head_layers", "genloss_depth"),
                     ("fm_head_batch_mul", "genloss_batch_mul"), ("latent_channels", "num_channels"),
                     ("latent_patch_size", "patch_size"), ("im_loss_weight", "image_loss_weight")):
        out[new] = out.pop(old)
    out.update(genloss_type="transport", genloss_net_arch="mlp", image_decoder_arch="Trans_E")
    return out


def test_release_config_1_1_equals_1_0(golden_dir):
    release = json.loads((golden_dir / "model" / "config.json").read_text())
    a = model_config_from_release(release)
    b = model_config_from_release(_as_1_1(release))
    assert b.schema == "1.1"
    b.schema = a.schema
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "unsupported architecture"),
    ({"architectures": ["MixtralForCausalLM"]}, "unsupported architecture"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": "heads + 1"}, "not divisible"),  # never divides the golden model's head count
    ({"use_gen_pos_embed": True}, "gen_pos_embed"),
])
def test_release_config_rejects(golden_dir, change, match):
    release = json.loads((golden_dir / "model" / "config.json").read_text())
    if change.get("num_key_value_heads") == "heads + 1":
        change = {"num_key_value_heads": release["num_attention_heads"] + 1}
    release.update(change)
    release = {k: v for k, v in release.items() if v is not None}
    with pytest.raises(CheckpointError, match=match):
        model_config_from_release(release)


def test_missing_o_attention_bias_follows_attention_bias(golden_dir):
    release = json.loads((golden_dir / "model" / "config.json").read_text())
    del release["o_attention_bias"]
    assert model_config_from_release(release).o_attention_bias == release["attention_bias"]


def test_vae_config_reads_normalisation(golden_dir):
    release = json.loads((golden_dir / "vae" / "config.json").read_text())
    cfg = vae_config_from_release(release)
    for key in ("scaling_factor", "shift_factor", "encoder_norm", "deterministic", "z_channels"):
        assert cfg[key] == release[key]
    assert tuple(cfg.ch_mult) == tuple(release["ch_mult"])
    with pytest.raises(CheckpointError, match="latent"):
        vae_config_from_release({k: v for k, v in release.items() if k != "scaling_factor"})
    with pytest.raises(CheckpointError, match="unknown VAE config fields"):
        vae_config_from_release({**release, "quant_conv": True})


def test_vae_config_missing_fields_fall_back_to_the_released_tokenizer(golden_dir):
    release = json.loads((golden_dir / "vae" / "config.json").read_text())
    for key in ("encoder_norm", "deterministic", "psz"):
        release.pop(key, None)
    cfg = vae_config_from_release(release)
    assert cfg.encoder_norm is True and cfg.deterministic is True and cfg.psz == 2
    assert vae_config_from_release({**release, "psz": None}).psz == 1


def test_unreadable_config_files_are_named(golden_dir, tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
        read_release_config(tmp_path, "nextstep")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_release_config(tmp_path, "vae")
    release = json.loads((golden_dir / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**release, "hidden_size": "wide"}))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid field value"):
        read_release_config(tmp_path, "nextstep")
