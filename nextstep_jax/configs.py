"""Config schema shared by ``configs/*.py`` and by release ``config.json`` files.

A model config is an ``ml_collections.ConfigDict`` with our own field names; ``model_config_from_release``
reads both released schemas (NextStep-1 ``fm_head_*``/``latent_*`` and NextStep-1.1
``genloss_*``/``num_channels``/``patch_size``) and remembers which one it came from so export can write the
same schema back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

SUPPORTED_MODEL_TYPES = ("nextstep",)
SUPPORTED_ARCHITECTURES = ("NextStep", "LlamaForCausalLM", "NextStepForCausalLM", "Qwen2ForCausalLM")


def replace(cfg: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with ``fields`` set; the original is untouched."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.update(fields)
    return out


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults = the released NextStep-1-Large hyper-parameters (REFERENCE §3.1)."""
    cfg = ml_collections.ConfigDict(
        dict(
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=13824,
            num_layers=48,
            num_heads=40,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-5,
            attention_bias=True,
            o_attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            latent_channels=16,
            latent_patch_size=2,
            fm_head_dim=1536,
            fm_head_layers=12,
            fm_head_mlp_ratio=1.0,
            fm_head_batch_mul=4,
            lm_loss_weight=0.01,
            im_loss_weight=1.0,
            boi=151667,
            eoi=151668,
            image_placeholder_id=151669,
            pad_token_id=151665,
            bos_token_id=151643,
            eos_token_id=151643,
            # Numerics and layout (ours, not in the release).
            dtype="float32",  # compute dtype; params are always float32
            scan_layers=True,
            remat_policy="none",  # none | full | dots | dots_with_no_batch_dims
            attention_impl="auto",  # auto | xla | cudnn | jax (jax.nn.dot_product_attention's own choice)
            # Fused projections (MaxText's fused_qkv / fused_mlp): q, k, v as one [embed, kv_heads, G+2, D]
            # kernel grouped by kv head, gate and up as one [embed, 2, mlp] kernel. One weight read per
            # layer instead of three / two, which is what bandwidth-bound decoding wants. Checkpoints and
            # the release use the separate layout; models.fused_layout converts between the two.
            fused_qkv=False,
            fused_mlp=False,
            # The first official training forward fed the raw hidden state to the FM head, skipping
            # image_out_projector; the later trainer and all inference apply it (REFERENCE §14 #1). True is
            # the consistent choice; False reproduces the first release's training loss bit for bit.
            loss_uses_out_projector=True,
            # Where the config came from: "1.0" or "1.1" release schema (export writes it back).
            schema="1.0",
        )
    )
    cfg.update(overrides)
    return cfg


def vae_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults = the released f8ch16 tokenizer (REFERENCE §8.1): architecture, encoder_norm with psz 2,
    deterministic posterior, identity latent scaling. Loading a release always reads its config.json."""
    cfg = ml_collections.ConfigDict(
        dict(
            resolution=256,
            in_channels=3,
            out_ch=3,
            ch=128,
            ch_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            z_channels=16,
            scaling_factor=1.0,
            shift_factor=0.0,
            encoder_norm=True,
            psz=2,
            deterministic=True,
            dtype="float32",
        )
    )
    cfg.update(overrides)
    return cfg


def _first(d: dict, *names: str, default: Any = KeyError) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is KeyError:
        raise KeyError(names[0])
    return default


def model_config_from_release(release: dict | str | Path) -> ml_collections.ConfigDict:
    """Build a model config from a release ``config.json`` (dict or path), either schema."""
    source = "config"
    if not isinstance(release, dict):
        source = str(release)
        release = json.loads(Path(release).read_text())
    model_type = release.get("model_type")
    archs = release.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise ValueError(
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
            # Official behaviour: a missing o_attention_bias follows attention_bias (REFERENCE §14 #14).
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
            boi=int(release["boi"]),
            eoi=int(release["eoi"]),
            image_placeholder_id=int(release["image_placeholder_id"]),
            pad_token_id=int(_first(release, "pad_token_id_added", "pad_token_id")),
            bos_token_id=int(_first(release, "bos_token_id", default=-1)),
            eos_token_id=int(_first(release, "eos_token_id", default=-1)),
            schema=schema,
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing required field {e.args[0]!r} for schema {schema}") from None
    if release.get("use_gen_pos_embed"):
        raise ValueError(f"{source}: use_gen_pos_embed=true is not supported (disabled in every release)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{source}: num_attention_heads {heads} not divisible by num_key_value_heads "
                         f"{cfg.num_kv_heads}")
    return cfg


def vae_config_from_release(release: dict | str | Path) -> ml_collections.ConfigDict:
    """VAE config from its release ``config.json``; every normalisation field is read, never assumed."""
    source = "config"
    if not isinstance(release, dict):
        source = str(release)
        release = json.loads(Path(release).read_text())
    known = set(vae_config().keys()) - {"dtype"}
    unknown = set(release) - known
    if unknown:
        raise ValueError(f"{source}: unknown VAE config fields {sorted(unknown)}")
    missing = {"scaling_factor", "shift_factor"} - set(release)
    if missing:
        raise ValueError(f"{source}: VAE config lacks {sorted(missing)}; refusing to guess the latent "
                         "normalisation (REFERENCE §14 #11)")
    fields = dict(release)
    if "ch_mult" in fields:
        fields["ch_mult"] = tuple(int(m) for m in fields["ch_mult"])
    if "psz" in fields and fields["psz"] is None:
        fields["psz"] = 1  # no patch grouping: encoder_norm normalises each pixel's z channels
    # Fields a config.json omits fall back to the released tokenizer's values, as REFERENCE §8.1 asks (the
    # scaling/shift pair is required above: guessing it would silently use the wrong latent space).
    return vae_config(**fields)
