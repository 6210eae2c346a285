"""Between the separate projection layout (the release's, checkpoints') and the fused one (``fused_qkv``,
``fused_mlp``; see ``configs.model_config``), on device and one layer at a time.

Fused q/k/v kernel [embed, KV, G+2, D]: for kv head j, the G query heads j·G … j·G+G-1 (the GQA grouping of
the release), then k_j, then v_j; biases [KV, G+2, D] alike. Fused gate/up kernel [embed, 2, mlp] (gate,
then up); biases [2, mlp]. Scanned layers carry their leading [layers] axis through unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nextstep_jax.configs import replace
from nextstep_jax.models.nextstep import abstract_variables
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, shardings_of


def _fuse_attention(attn: dict, kv_heads: int) -> None:
    q, k, v = attn.pop("q_proj"), attn.pop("k_proj"), attn.pop("v_proj")
    fused = {}
    for name in q:  # kernel [..., E, H, D] / bias [..., H, D]
        grouped = q[name].reshape(*q[name].shape[:-2], kv_heads, -1, q[name].shape[-1])
        fused[name] = jnp.concatenate([grouped, k[name][..., None, :], v[name][..., None, :]], axis=-2)
    attn["qkv_proj"] = fused


def _unfuse_attention(attn: dict, num_heads: int) -> None:
    fused = attn.pop("qkv_proj")
    for name, value in fused.items():
        groups = value.shape[-2] - 2
        attn.setdefault("q_proj", {})[name] = value[..., :groups, :].reshape(*value.shape[:-3], num_heads,
                                                                           value.shape[-1])
        attn.setdefault("k_proj", {})[name] = value[..., groups, :]
        attn.setdefault("v_proj", {})[name] = value[..., groups + 1, :]


def _fuse_mlp(mlp: dict) -> None:
    gate, up = mlp.pop("gate_proj"), mlp.pop("up_proj")
    mlp["gate_up_proj"] = {name: jnp.stack([gate[name], up[name]], axis=-2) for name in gate}


def _unfuse_mlp(mlp: dict) -> None:
    fused = mlp.pop("gate_up_proj")
    mlp["gate_proj"] = {name: value[..., 0, :] for name, value in fused.items()}
    mlp["up_proj"] = {name: value[..., 1, :] for name, value in fused.items()}


def _relayout(cfg_from, cfg_to, params, mesh, rules, donate: bool) -> dict:
    """One jitted conversion per layer (one compilation for all unrolled layers), so the peak is the model
    plus one layer's projections, not a second copy of every layer's."""
    def convert(layer):
        if cfg_from.fused_qkv != cfg_to.fused_qkv:
            attn = layer["self_attn"]
            if cfg_to.fused_qkv:
                _fuse_attention(attn, cfg_to.num_kv_heads)
            else:
                _unfuse_attention(attn, cfg_to.num_heads)
        if cfg_from.fused_mlp != cfg_to.fused_mlp:
            (_fuse_mlp if cfg_to.fused_mlp else _unfuse_mlp)(layer["mlp"])
        return layer

    backbone = dict(params["backbone"])
    names = [k for k in backbone if k == "layers" or k.startswith("layers_")]
    # Every layer subtree has the same shardings (scanned models have one subtree).
    out = None if mesh is None else shardings_of(abstract_variables(cfg_to)["params"], mesh, rules)["backbone"][
        names[0]]
    fn = jax.jit(convert, out_shardings=out, donate_argnums=(0,) if donate else ())
    with warnings.catch_warnings():
        # Donated projections cannot alias the differently shaped fused ones; they are freed all the same.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        for name in names:
            backbone[name] = fn(backbone[name])
    return {**params, "backbone": backbone}


def fuse_projections(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False
                     ) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) with q/k/v and gate/up fused; already fused parts stay as they are. ``mesh``: place
    the converted layers in the fused model's logical shardings. ``donate``: free each input layer once it
    is converted (the input tree is unusable afterwards)."""
    to = replace(cfg, fused_qkv=True, fused_mlp=True)
    return to, _relayout(cfg, to, params, mesh, rules, donate)


def unfuse_projections(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False
                       ) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) in the separate (release) layout."""
    to = replace(cfg, fused_qkv=False, fused_mlp=False)
    return to, _relayout(cfg, to, params, mesh, rules, donate)
