"""Release ``config.json`` files parsed into our configs and validated, for both released schemas.

A model config is an ``ml_collections.ConfigDict`` with our own field names (``configs.model_config``);
``model_config_from_release`` reads both released schemas (NextStep-1 ``fm_head_*``/``latent_*`` and
NextStep-1.1 ``genloss_*``/``num_channels``/``patch_size``) and remembers which one it came from so export
can write the same schema back. Every way a file can be wrong is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.configs import model_config, replace, vae_config

__all__ = ["complete_model_config", "model_config_from_release", "read_release_config", "vae_config_from_release"]

CONFIG_FILE = "config.json"
SUPPORTED_MODEL_TYPES = ("nextstep",)
SUPPORTED_ARCHITECTURES = ("NextStep", "LlamaForCausalLM", "NextStepForCausalLM", "Qwen2ForCausalLM")


def _fields(release: dict | str | Path) -> tuple[str, dict]:
    """(name for messages, the parsed fields) of a config given as a dict or a path."""
    if isinstance(release, dict):
        return "config", release
    try:
        fields = json.loads(Path(release).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{release}: not valid JSON: {e}") from e
    if not isinstance(fields, dict):
        raise CheckpointError(f"{release}: not a JSON object")
    return str(release), fields


def _first(d: dict, *names: str, default: Any = KeyError) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is KeyError:
        raise KeyError(names[0])
    return default


def model_config_from_release(release: dict | str | Path) -> ml_collections.ConfigDict:
    """Build a model config from a release ``config.json`` (dict or path), either schema."""
    source, release = _fields(release)
    model_type = release.get("model_type")
    archs = release.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise CheckpointError(
            f"{source}: unsupported architecture model_type={model_type!r} architectures={archs!r}; "
            f"expected model_type in {SUPPORTED_MODEL_TYPES}"
        )
    schema = "1.1" if any(k.startswith("genloss_") for k in release) else "1.0"
    try:
        hidden = int(release["hidden_size"])
        heads = int(release["num_attention_heads"])
        attention_bias = bool(release.get("attention_bias", True))
        cfg = model_config(
            vocab_size=int(release["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(release["intermediate_size"]),
            num_layers=int(release["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(release.get("num_key_value_heads", heads)),
            head_dim=int(release.get("head_dim") or hidden // heads),
            rope_theta=float(release.get("rope_theta", 1_000_000.0)),
            rms_norm_eps=float(release.get("rms_norm_eps", 1e-5)),
            attention_bias=attention_bias,
            # Official behaviour: a missing o_attention_bias follows attention_bias.
            o_attention_bias=bool(release.get("o_attention_bias", attention_bias)),
            mlp_bias=bool(release.get("mlp_bias", False)),
            tie_word_embeddings=bool(release.get("tie_word_embeddings", False)),
            latent_channels=int(_first(release, "latent_channels", "num_channels")),
            latent_patch_size=int(_first(release, "latent_patch_size", "patch_size")),
            fm_head_dim=int(_first(release, "fm_head_dim", "genloss_width")),
            fm_head_layers=int(_first(release, "fm_head_layers", "genloss_depth")),
            fm_head_mlp_ratio=float(_first(release, "fm_head_mlp_ratio", "genloss_mlp_ratio", default=1.0)),
            fm_head_batch_mul=int(_first(release, "fm_head_batch_mul", "genloss_batch_mul")),
            lm_loss_weight=float(release.get("lm_loss_weight", 0.01)),
            im_loss_weight=float(_first(release, "im_loss_weight", "image_loss_weight", default=1.0)),
            noise_strength=float(release.get("noise_strength", 0.0)),
            boi=int(release["boi"]),
            eoi=int(release["eoi"]),
            image_placeholder_id=int(release["image_placeholder_id"]),
            pad_token_id=int(_first(release, "pad_token_id_added", "pad_token_id")),
            bos_token_id=int(_first(release, "bos_token_id", default=-1)),
            eos_token_id=int(_first(release, "eos_token_id", default=-1)),
            schema=schema,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing required field {e.args[0]!r} for schema {schema}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid field value ({e})") from None
    if release.get("use_gen_pos_embed"):
        raise CheckpointError(f"{source}: use_gen_pos_embed=true is not supported (disabled in every release)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads {heads} not divisible by num_key_value_heads "
                              f"{cfg.num_kv_heads}")
    return cfg


def vae_config_from_release(release: dict | str | Path) -> ml_collections.ConfigDict:
    """VAE config from its release ``config.json``; every normalisation field is read, never assumed."""
    source, release = _fields(release)
    known = set(vae_config().keys()) - {"dtype"}
    unknown = set(release) - known
    if unknown:
        raise CheckpointError(f"{source}: unknown VAE config fields {sorted(unknown)}")
    missing = {"scaling_factor", "shift_factor"} - set(release)
    if missing:
        raise CheckpointError(f"{source}: VAE config lacks {sorted(missing)}; refusing to guess the latent "
                              "normalisation (the code defaults are Flux's, not the release's)")
    fields = dict(release)
    if "psz" in fields and fields["psz"] is None:
        fields["psz"] = 1  # no patch grouping: encoder_norm normalises each pixel's z channels
    try:
        if "ch_mult" in fields:
            fields["ch_mult"] = tuple(int(m) for m in fields["ch_mult"])
        # Fields a config.json omits fall back to the released tokenizer's values
        # (the scaling/shift pair is required above: guessing it would silently use the wrong latent space).
        return vae_config(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid field value ({e})") from None


def read_release_config(folder: str | Path, kind: str) -> ml_collections.ConfigDict:
    """The config of a release folder of ``kind`` ("nextstep" or "vae") from its ``config.json``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}")
    return model_config_from_release(path) if kind == "nextstep" else vae_config_from_release(path)


def complete_model_config(cfg: ml_collections.ConfigDict, keys: list[str], *, scan_layers: bool
                          ) -> ml_collections.ConfigDict:
    """A copy of a release's model config with the layer layout and what only the tensor keys decide."""
    # Whether o_proj has a bias is decided by the weights, not the config (released configs disagree).
    return replace(cfg, scan_layers=scan_layers,
                   o_attention_bias=any(k.endswith("self_attn.o_proj.bias") for k in keys))
