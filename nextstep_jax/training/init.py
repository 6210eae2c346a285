"""Where a training run's first params come from (``config.init``):

  scratch     the model's own initialisation (that of the reference: normal(0.02) embeddings, backbone,
              projectors and ``lm_head``; the flow-matching head's xavier / zero init)
  checkpoint  an official release folder or a converted checkpoint (``checkpoint.load_model``), e.g. to
              fine-tune NextStep-1-Large for editing
  qwen        a plain Qwen2(.5) LLM folder (``config.json`` + safetensors), as the official stage 1 starts from
              Qwen2.5-14B: the LM's embedding table, layers, final norm and ``lm_head`` overwrite a scratch
              init, so the new modules (both projectors, the flow-matching head) keep the scratch values

The special tokens NextStep adds need no new rows: they take ids inside the LM's embedding table (Qwen2.5's
152064 rows exceed its 151665 tokenizer entries), whose rows are copied as they are, as the official trainer
does. A table of another size than ``model.vocab_size`` is refused, naming both. For an LM that ties its
output layer to the embeddings (no ``lm_head.weight``), an untied ``lm_head`` starts as the transposed
embedding table, i.e. the function the LM computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import nextstep_table, params_from_tensors
from nextstep_jax.checkpoint.release.folder import canonical_key
from nextstep_jax.checkpoint.release.safetensors import SafetensorsReader
from nextstep_jax.models.nextstep import init_params
from nextstep_jax.sharding import LOGICAL_AXIS_RULES

SOURCES = ("scratch", "checkpoint", "qwen")
LM_PREFIXES = ("embed_tokens.", "layers.", "norm.", "lm_head.")

# Fields that fix the parameter shapes: an init checkpoint must agree with the run's model config on them.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "attention_bias", "o_attention_bias", "mlp_bias",
                       "tie_word_embeddings", "latent_channels", "latent_patch_size", "fm_head_dim",
                       "fm_head_layers", "fm_head_mlp_ratio")


class InitError(ValueError):
    """A missing or unusable init source; the message names it."""


def init_config() -> ml_collections.ConfigDict:
    """Defaults of ``config.init``."""
    return ml_collections.ConfigDict(dict(
        source="scratch",  # scratch | checkpoint | qwen
        path="",  # the checkpoint or Qwen folder
        # The frozen VAE (release folder or converted checkpoint; the trainer loads it). "": the init
        # checkpoint's vae/ folder when it has one, else a scratch VAE (random weights: tests, demos).
        vae="",
    ))


def initial_params(init: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, rng: jax.Array, *,
                   mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> dict:
    """float32 params for ``model_cfg`` from ``init.source``, sharded over ``mesh`` by their logical axes."""
    if init.source not in SOURCES:
        raise InitError(f"init.source={init.source!r} is not one of {SOURCES}")
    if init.source == "scratch":
        return init_params(model_cfg, rng, mesh, rules)
    path = Path(init.path) if init.path else None
    if path is None or not path.is_dir():
        raise InitError(f"init.path={init.path!r}: no such folder (init.source={init.source!r} needs one)")
    if init.source == "checkpoint":
        return from_checkpoint(path, model_cfg, mesh=mesh, rules=rules)
    return from_qwen(path, model_cfg, rng, mesh=mesh, rules=rules)


def architecture_mismatches(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in ARCHITECTURE_FIELDS if a.get(k) != b.get(k)]


def from_checkpoint(path: str | Path, model_cfg: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                    rules=LOGICAL_AXIS_RULES) -> dict:
    """Params of a release folder or converted checkpoint, in ``model_cfg``'s layout (scanned or unrolled,
    fused or not). Its architecture must equal ``model_cfg``'s."""
    from nextstep_jax.checkpoint import load_model, read_model_config

    if model_cfg.fused_qkv != model_cfg.fused_mlp:
        raise InitError("init from a checkpoint loads q/k/v and gate/up fused together or not at all; set "
                        f"model.fused_qkv ({model_cfg.fused_qkv}) and model.fused_mlp ({model_cfg.fused_mlp}) alike")
    try:
        stored = read_model_config(path)
    except CheckpointError as e:
        raise InitError(f"init.path={path}: {e}") from None
    wrong = architecture_mismatches(stored, model_cfg)
    if wrong:
        raise InitError(f"init.path={path}: the checkpoint's architecture differs from config.model "
                        f"(checkpoint vs config): {'; '.join(wrong)}")
    _, params = load_model(path, dtype=np.float32, layers="scanned" if model_cfg.scan_layers else "unrolled",
                           fused=model_cfg.fused_qkv, mesh=mesh, rules=rules)
    return params


def _qwen_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InitError(f"{folder}: no config.json (expected a Qwen2 LLM folder)")
    try:
        fields = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise InitError(f"{config_path}: not valid JSON: {e}") from None
    if fields.get("model_type") != "qwen2":
        raise InitError(f"{config_path}: model_type {fields.get('model_type')!r}, expected 'qwen2'")
    return fields


def _check_qwen_config(source: Path, qwen: dict, cfg: ml_collections.ConfigDict) -> None:
    if qwen.get("vocab_size") != cfg.vocab_size:
        raise InitError(f"{source}: the LLM's vocabulary has {qwen.get('vocab_size')} embedding rows, "
                        f"config.model.vocab_size is {cfg.vocab_size}")
    heads = qwen.get("num_attention_heads")
    pairs = {  # our field -> (Qwen value, our value)
        "hidden_size": (qwen.get("hidden_size"), cfg.hidden_size),
        "intermediate_size": (qwen.get("intermediate_size"), cfg.intermediate_size),
        "num_layers": (qwen.get("num_hidden_layers"), cfg.num_layers),
        "num_heads": (heads, cfg.num_heads),
        "num_kv_heads": (qwen.get("num_key_value_heads", heads), cfg.num_kv_heads),
        "head_dim": (qwen.get("head_dim") or (qwen.get("hidden_size", 0) // heads if heads else None), cfg.head_dim),
        "rope_theta": (float(qwen.get("rope_theta", 10000.0)), float(cfg.rope_theta)),
        "rms_norm_eps": (float(qwen.get("rms_norm_eps", 1e-6)), float(cfg.rms_norm_eps)),
        # Qwen2 always has q/k/v biases and none on o_proj or the MLP.
        "attention_bias": (True, cfg.attention_bias),
        "o_attention_bias": (False, cfg.o_attention_bias),
        "mlp_bias": (False, cfg.mlp_bias),
    }
    wrong = [f"{k}: {q!r} vs {ours!r}" for k, (q, ours) in pairs.items() if q != ours]
    if wrong:
        raise InitError(f"{source}: the LLM does not fit config.model (LLM vs config): {'; '.join(wrong)}")
    if cfg.tie_word_embeddings and not qwen.get("tie_word_embeddings", False):
        raise InitError(f"{source}: config.model.tie_word_embeddings is True but the LLM has its own lm_head")
    for name in ("boi", "eoi", "image_placeholder_id", "pad_token_id"):
        if cfg.get(name) is not None and not 0 <= cfg[name] < cfg.vocab_size:
            raise InitError(f"config.model.{name}={cfg[name]} is outside the LLM's {cfg.vocab_size} embedding rows")


def from_qwen(path: str | Path, model_cfg: ml_collections.ConfigDict, rng: jax.Array, *, mesh: Mesh | None = None,
              rules=LOGICAL_AXIS_RULES) -> dict:
    """A scratch init of ``model_cfg`` whose LM part is replaced by the Qwen2 LLM in ``path``."""
    folder = Path(path)
    qwen = _qwen_config(folder)
    _check_qwen_config(folder / "config.json", qwen, model_cfg)
    if model_cfg.fused_qkv or model_cfg.fused_mlp:
        raise InitError("init from a Qwen LLM builds the release layout: set model.fused_qkv and model.fused_mlp "
                        "to False for training (decoding fuses them later)")
    table = [e for e in nextstep_table(model_cfg) if e.torch_key.startswith(LM_PREFIXES)]
    try:
        reader = SafetensorsReader(folder)
    except CheckpointError as e:
        raise InitError(f"{folder}: {e}") from None
    with reader:
        spelled = {canonical_key(k): k for k in reader.keys()}
        tied = bool(qwen.get("tie_word_embeddings", False)) and not model_cfg.tie_word_embeddings
        source = {}  # table key -> file key
        for e in table:
            # A tied LM's output layer is its [vocab, E] embedding table, the shape of lm_head.weight.
            key = "embed_tokens.weight" if tied and e.torch_key == "lm_head.weight" else e.torch_key
            if key not in spelled:
                raise InitError(f"{folder}: no tensor {key!r} (nor 'model.{key}') in the LLM's safetensors")
            shape = tuple(reader.info(spelled[key]).shape)
            if shape != e.torch_shape:
                raise InitError(f"{folder}: tensor {spelled[key]!r} has shape {shape}, config.model expects "
                                f"{e.torch_shape}")
            source[e.torch_key] = spelled[key]
        params = init_params(model_cfg, rng, mesh, rules)
        loaded = params_from_tensors(table, lambda key: reader.read(source[key]).astype(np.float32),
                                     lambda path, value: _like(_leaf(params, path), value))
    return _merge(params, loaded)


def _leaf(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _like(target: jax.Array, value: np.ndarray) -> jax.Array:
    """``value`` as an array with ``target``'s sharding; each device receives only its own block."""
    return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out
