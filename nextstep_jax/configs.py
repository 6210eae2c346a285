"""Config schema shared by ``configs/*.py``, and the one CLI config path.

Every CLI that runs a model takes ``--config FILE`` (a Python file whose ``get_config()`` returns a
ConfigDict, as in big_vision) and ``--config.a.b=value`` overrides. Precedence, lowest first: built-in
defaults < the config file < settings stored with the model < ``--config.*`` overrides < explicit flags.

A model config is an ``ml_collections.ConfigDict`` with our own field names; a release's ``config.json``
is read into one by ``checkpoint.release.config``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections


def replace(cfg: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with ``fields`` set; the original is untouched."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.update(fields)
    return out


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults = the released NextStep-1-Large hyper-parameters (its config.json)."""
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
            # Training only: std of the Gaussian noise on each input image token, growing linearly from 0 at an
            # image's first token to this value at its last (raster order); FM targets stay clean.
            noise_strength=0.0,
            boi=151667,
            eoi=151668,
            image_placeholder_id=151669,
            pad_token_id=151665,
            bos_token_id=151643,
            eos_token_id=151643,
            # Numerics and layout (ours, not in the release).
            dtype="float32",  # compute dtype; params are always float32
            scan_layers=True,
            # none | full | dots | dots_with_no_batch_dims | nothing_saveable | save_qkv_attention |
            # offload_qkv_attention | offload_dots_with_no_batch_dims (models/backbone.py REMAT_POLICIES)
            remat_policy="none",
            # The loss runs the LM head and FM head over sequence chunks of this many positions (a
            # rematerialised scan), so full-vocabulary logits exist for one chunk at a time.
            loss_chunk_size=1024,
            # auto | xla | splash (TPU) | cudnn (GPU); auto: splash on TPU, cuDNN on GPU in 16-bit, else xla
            attention_impl="auto",
            attention_block_q=512,  # splash tile sizes (clipped to the sequence length)
            attention_block_kv=512,
            # Fused projections (MaxText's fused_qkv / fused_mlp): q, k, v as one [embed, kv_heads, G+2, D]
            # kernel grouped by kv head, gate and up as one [embed, 2, mlp] kernel. One weight read per
            # layer instead of three / two, which is what bandwidth-bound decoding wants. Checkpoints and
            # the release use the separate layout; models.layouts converts between the two.
            fused_qkv=False,
            fused_mlp=False,
            # The first official training forward fed the raw hidden state to the FM head, skipping
            # image_out_projector; the later trainer and all inference apply it. True is
            # the consistent choice; False reproduces the first release's training loss bit for bit.
            loss_uses_out_projector=True,
            # Where the config came from: "1.0" or "1.1" release schema (export writes it back).
            schema="1.0",
        )
    )
    cfg.update(overrides)
    return cfg


def vae_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults = the released f8ch16 tokenizer (its config.json): architecture, encoder_norm with psz 2,
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


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``data`` section (``data.pipeline.DataConfig.from_config`` reads it). Facts of the model (patch size,
    latent channels, VAE down factor) are not repeated here: they come from the ``model`` and ``vae`` sections."""
    cfg = ml_collections.ConfigDict(
        dict(
            seq_len=8192,
            batch_size=1,  # packed rows per step over ALL processes; each process packs batch_size / process_count
            image_input="pixels",  # "pixels" (the VAE runs in the train step) or "latents" (cached by encode_latents)
            image_size=256,
            multi_aspect=False,  # aspect-ratio buckets; needs image_input="latents"
            # images per row (None: as many as fit); with cached latents it also bounds the FM head's work
            max_images_per_row=None,
            caption_dropout=0.3,
            edit_dropout=0.2,
            document_masking=True,  # False = the official unmasked stream, for comparisons
            max_pixels=None,  # skip images declaring more pixels (None: the decoder's default bomb limit)
            seed=0,
            num_epochs=None,  # None = repeat forever (training); 1 = one pass (evaluation)
            num_workers=0,
            worker_buffer_size=2,
            # packed batches a background thread prepares while the step runs, when num_workers is 0 (0: none)
            prefetch_batches=2,
            read_threads=2,
            read_buffer_size=16,
            # A tokenizer folder or file, or "builtin:bytes"; None: the tokenizer that ships with the model.
            tokenizer=None,
            # Each a dict of data.pipeline.DatasetSpec fields, e.g. {"source": "shapes"} or {"source": DIR, "weight": 3}.
            datasets=(),
        )
    )
    cfg.update(overrides)
    return cfg


# Model-config special-token fields and the tokenizer's SpecialIds field each is read from.
TOKENIZER_ID_FIELDS = {"boi": "boi", "eoi": "eoi", "image_placeholder_id": "placeholder", "pad_token_id": "pad",
                       "bos_token_id": "eos", "eos_token_id": "eos"}


def with_tokenizer_ids(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose model special-token ids come from the tokenizer ``data.tokenizer`` names.

    Ids the model section leaves None are filled in; ids it sets must equal the tokenizer's (a model reads the
    ids of the tokenizer it was trained with). Without ``data.tokenizer`` the config is returned unchanged.
    """
    name = config.get("data", {}).get("tokenizer")
    if not name:
        return config
    from nextstep_jax.data.tokenizer import load_tokenizer  # lazily: reading configs needs no tokenizer libraries

    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={name}: {e}") from None
    out = ml_collections.ConfigDict(config.to_dict())
    for field, special in TOKENIZER_ID_FIELDS.items():
        want, have = getattr(tokenizer.special, special), out.model.get(field)
        if have is None:
            out.model[field] = want
        elif have != want:
            raise ConfigError(f"model.{field}={have} but tokenizer {name} has id {want} "
                              f"(set model.{field}=None to take the tokenizer's)")
    if out.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={out.model.vocab_size} is smaller than tokenizer {name}'s "
                          f"{tokenizer.vocab_size} tokens")
    return out


class ConfigError(ValueError):
    """A bad config file, section or override; the message names the file or key."""


PRECEDENCE_HELP = ("settings, lowest precedence first: built-in defaults < --config FILE < settings stored "
                   "with the model < --config.a.b=value overrides < explicit flags")


def sampling_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``sampling`` section: image generation settings (``generation.settings.SamplingSettings`` is its
    validated form). Defaults are the official pipeline's; a model folder may carry its own in
    ``sampling.json``."""
    cfg = ml_collections.ConfigDict(
        dict(
            hw=(512, 512),  # output height, width (multiples of the VAE stride × patch size)
            guidance_scale=7.5,  # text classifier-free guidance, the official `cfg` (1 = off)
            image_guidance_scale=1.0,  # image guidance when editing, the official `cfg_img` (1 = off)
            guidance_schedule="constant",  # constant | linear (NextStep-1 pipeline) | linear_increasing (later)
            num_steps=50,  # flow-matching steps per image token
            timesteps_shift=1.0,
            method="sde",  # sde (as released) | ode (plain Euler)
            time_grid=None,  # nextstep1 (released, ends at 1-δ) | nextstep1.1 (ends at 1); None: by model schema
            last_step_size=0.04,  # δ of the nextstep1 grid's final Euler step
            use_norm=None,  # layer-normalise sampled tokens; None: on for NextStep-1, off for 1.1
            positive_prompt=None,  # appended to every caption after one space
            negative_prompt=None,  # the unconditional rows' text (None: empty)
            prepend_bos=False,  # BOS before every prompt (off for NextStep-1)
            length_bucket=64,  # prompt lengths are padded to a multiple, so prompts share one compilation
            text_tokens=0,  # decode up to this many text tokens (e.g. a thinking span) before the image
            temperature=0.0,  # of that text (0 = greedy)
            top_p=1.0,  # nucleus mass of that text
        )
    )
    cfg.update(overrides)
    return cfg


def mesh_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Mesh axis sizes; one axis may be -1 (all remaining devices)."""
    cfg = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    cfg.update(overrides)
    return cfg


def default_config() -> ml_collections.ConfigDict:
    """The built-in defaults every CLI starts from: the released model, tokenizer, data, sampling and mesh."""
    return ml_collections.ConfigDict(dict(model=model_config(), vae=vae_config(), data=data_config(),
                                          sampling=sampling_config(), mesh=mesh_config()))


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Run ``get_config()`` of a config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"nextstep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"{path}: defines no get_config()")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a user's file is reported as that file's error
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def merge(base: ml_collections.ConfigDict, update: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """A copy of ``base`` with ``update`` merged in, section by section (sections may be new)."""
    out = ml_collections.ConfigDict(base.to_dict())
    for key, value in update.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(out.get(key), ml_collections.ConfigDict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return out


def _parse_value(key: str, text: str, current: Any) -> Any:
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:  # an unset field: true/false as for booleans, anything else as text
            return {"true": True, "false": False}.get(text.lower(), text)
        raise ConfigError(f"--config.{key}={text}: not a {type(current).__name__} literal") from None
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if type(value) is not type(current):
        raise ConfigError(f"--config.{key}={text}: expected {type(current).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``"a.b=value"`` overrides applied; each key must exist."""
    out = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config.{item}: expected --config.a.b=value")
        *parents, leaf = key.split(".")
        node = out
        for depth, name in enumerate(parents):
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: no section {'.'.join(parents[:depth + 1])!r}")
        if leaf not in node:
            raise ConfigError(f"--config.{key}: no such field (fields here: {', '.join(sorted(node.keys()))})")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: is a section; set one of its fields")
        node[leaf] = _parse_value(key, text, node[leaf])
    return out


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--config FILE``; ``--config.a.b=value`` overrides are taken by ``parse_args``."""
    parser.add_argument("--config", metavar="FILE", required=required,
                        help="config file with get_config(); override any field with --config.a.b=value")
    parser.epilog = "\n".join(filter(None, [parser.epilog, PRECEDENCE_HELP[0].upper() + PRECEDENCE_HELP[1:] + "."]))


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
               ) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv``, splitting off ``--config.a.b=value`` (or ``--config.a.b value``) overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    parser.error(f"{arg}: expected {arg}=value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return parser.parse_args(rest), overrides


def resolve(args: argparse.Namespace, overrides: Sequence[str], *, default: ml_collections.ConfigDict | None = None,
            stored: ml_collections.ConfigDict | dict | None = None) -> ml_collections.ConfigDict:
    """defaults < ``args.config`` file < ``stored`` (settings kept with a model) < ``--config.*`` overrides.

    Explicit flags come last; the caller applies them to the returned config. The model's special-token ids
    are then read from ``data.tokenizer`` where one is named (``with_tokenizer_ids``).
    """
    config = default_config() if default is None else default
    if getattr(args, "config", None):
        config = merge(config, load_config_file(args.config))
    if stored:
        config = merge(config, stored)
    return with_tokenizer_ids(apply_overrides(config, overrides))
