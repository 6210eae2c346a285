"""A trained model in the official release layout, through the checkpoint mapping table:

    DEST/config.json             the NextStep config in the release's field names (the model's schema)
    DEST/model.safetensors       every parameter under its PyTorch key (sharded with an index past 5 GB)
    DEST/tokenizer.json ...      the run's text tokenizer
    DEST/sampling.json           the run's sampling settings (``python -m nextstep_jax.sample`` reads them)
    DEST/vae/config.json, vae/checkpoint.safetensors   the frozen VAE

``checkpoint.load_model(DEST)`` / ``load_vae(DEST / "vae")`` and the official PyTorch code read it. Params are
written in float32, as trained. With several processes every process gathers each parameter and process 0
writes, so that host holds the whole model once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np

from nextstep_jax.checkpoint.mapping import nextstep_table, tensors_from_params, vae_table
from nextstep_jax.checkpoint.release.safetensors import TensorSpec, write_safetensors, write_sharded
from nextstep_jax.data.tokenizer import BYTE_LEVEL, load_tokenizer
from nextstep_jax.generation.settings import STORED_SETTINGS_FILE
from nextstep_jax.io.atomic import atomic_folder

MAX_SHARD_BYTES = 5 * 2**30  # the official releases' shard size
VAE_DIR, VAE_WEIGHTS = "vae", "checkpoint.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# Our model-config field -> its name in each released config.json schema (the inverse of
# checkpoint.release.config.model_config_from_release).
COMMON_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "rope_theta": "rope_theta",
                 "rms_norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                 "o_attention_bias": "o_attention_bias", "mlp_bias": "mlp_bias",
                 "tie_word_embeddings": "tie_word_embeddings", "lm_loss_weight": "lm_loss_weight",
                 "noise_strength": "noise_strength", "boi": "boi",
                 "eoi": "eoi", "image_placeholder_id": "image_placeholder_id", "pad_token_id": "pad_token_id_added",
                 "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
SCHEMA_FIELDS = {
    "1.0": {"latent_channels": "latent_channels", "latent_patch_size": "latent_patch_size",
            "fm_head_dim": "fm_head_dim", "fm_head_layers": "fm_head_layers", "fm_head_mlp_ratio": "fm_head_mlp_ratio",
            "fm_head_batch_mul": "fm_head_batch_mul", "im_loss_weight": "im_loss_weight"},
    "1.1": {"latent_channels": "num_channels", "latent_patch_size": "patch_size", "fm_head_dim": "genloss_width",
            "fm_head_layers": "genloss_depth", "fm_head_mlp_ratio": "genloss_mlp_ratio",
            "fm_head_batch_mul": "genloss_batch_mul", "im_loss_weight": "image_loss_weight"},
}


def release_model_config(cfg: ml_collections.ConfigDict, base: dict | None = None) -> dict:
    """The ``config.json`` of ``cfg`` in its schema; fields of ``base`` (e.g. the init release's own
    config.json) that we do not model are kept."""
    out = dict(base or {})
    out.update(model_type="nextstep", use_gen_pos_embed=False, torch_dtype="float32")
    out.setdefault("architectures", ["NextStep"])
    out.setdefault("hidden_act", "silu")
    for ours, theirs in {**COMMON_FIELDS, **SCHEMA_FIELDS[cfg.schema]}.items():
        out[theirs] = cfg[ours]
    out["pad_token_id"] = cfg.pad_token_id
    return out


def _on_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _specs(table, params) -> list[TensorSpec]:
    return [TensorSpec.of(key, value) for key, value in tensors_from_params(table, params)]


def _copy_tokenizer(tokenizer: str, out: Path) -> None:
    if tokenizer == BYTE_LEVEL:
        (out / "tokenizer.json").write_text(load_tokenizer(BYTE_LEVEL).to_json())
        return
    path = Path(tokenizer)
    for source in ([path / name for name in TOKENIZER_FILES] if path.is_dir() else [path]):
        if source.is_file():
            shutil.copyfile(source, out / source.name)


def write_release(dest: str | Path, model_cfg: ml_collections.ConfigDict, params, vae_cfg: ml_collections.ConfigDict,
                   vae_params, *, tokenizer: str, sampling: ml_collections.ConfigDict | None = None,
                   base_config: dict | None = None) -> Path:
    """Write the release folder ``dest`` (which must not exist) atomically; returns it."""
    params, vae_params = jax.tree.map(_on_host, params), jax.tree.map(_on_host, vae_params)
    if jax.process_index() != 0:
        return Path(dest)
    with atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text(json.dumps(release_model_config(model_cfg, base_config), indent=2,
                                                    sort_keys=True) + "\n")
        write_sharded(tmp, _specs(nextstep_table(model_cfg), params), MAX_SHARD_BYTES, {"format": "pt"})
        _copy_tokenizer(tokenizer, tmp)
        if sampling is not None:
            (tmp / STORED_SETTINGS_FILE).write_text(json.dumps(sampling.to_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / VAE_DIR).mkdir()
        _write_vae(tmp / VAE_DIR, vae_cfg, vae_params)
    return Path(dest)


def _write_vae(out: Path, vae_cfg: ml_collections.ConfigDict, vae_params) -> None:
    vae_fields = {k: v for k, v in vae_cfg.to_dict().items() if k != "dtype"}
    (out / "config.json").write_text(json.dumps(vae_fields, indent=2, sort_keys=True) + "\n")
    write_safetensors(out / VAE_WEIGHTS, _specs(vae_table(vae_cfg), vae_params), {"format": "pt"})


def write_vae_release(dest: str | Path, vae_cfg: ml_collections.ConfigDict, vae_params) -> Path:
    """Write a tokenizer release folder ``dest`` (absent or empty: ``config.json`` + ``checkpoint.safetensors``,
    as ``vae/`` above) atomically; returns it."""
    vae_params = jax.tree.map(_on_host, vae_params)
    dest = Path(dest)
    if jax.process_index() != 0:
        return dest
    with atomic_folder(dest, overwrite=dest.is_dir() and not any(dest.iterdir())) as tmp:
        _write_vae(tmp, vae_cfg, vae_params)
    return dest
