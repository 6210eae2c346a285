"""Qwen2-style causal decoder: pre-norm layers stacked with ``nn.scan`` (one compiled layer) or unrolled,
optional ``nn.remat``, and a static KV cache for decoding.

The cache is an explicit pytree, not a Flax collection, holding post-RoPE keys: with scanned layers
``{"k", "v"}`` of shape [layers, B, KV, S, D]; unrolled, a list of per-layer ``{"k", "v"}`` [B, KV, S, D]
(no per-step restacking). The caller owns slot bookkeeping (write index, key validity) and passes the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.models.attention import dot_product_attention, update_cache
from nextstep_jax.models.layers import MLP, Projection, RMSNorm, apply_rope, as_dtype, rope_tables
from nextstep_jax.sharding import constrain

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}

_ACT = ("activation_batch", "activation_length", "activation_embed")
_ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_ACT_KV = ("activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")


class Attention(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        cfg = self.cfg
        dtype = as_dtype(cfg.dtype)

        def proj(heads, names, name):
            return Projection((*heads, cfg.head_dim), names, use_bias=cfg.attention_bias, dtype=dtype, name=name)

        if cfg.fused_qkv:
            # Grouped by kv head, [G query heads, k, v], so sharding kv_heads keeps each group on one shard.
            groups = cfg.num_heads // cfg.num_kv_heads
            qkv = proj((cfg.num_kv_heads, groups + 2), ("embed", "kv_heads", "qkv", "head_dim"), "qkv_proj")(x)
            q = qkv[:, :, :, :groups].reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)
            k, v = qkv[:, :, :, groups], qkv[:, :, :, groups + 1]
        else:
            q = proj((cfg.num_heads,), ("embed", "heads", "head_dim"), "q_proj")(x)
            k = proj((cfg.num_kv_heads,), ("embed", "kv_heads", "head_dim"), "k_proj")(x)
            v = proj((cfg.num_kv_heads,), ("embed", "kv_heads", "head_dim"), "v_proj")(x)
        q = constrain(apply_rope(q, cos, sin), _ACT_HEADS)
        # Heads-major keys/values, the layout of the cache and of attention's inputs.
        k = constrain(apply_rope(k, cos, sin).transpose(0, 2, 1, 3), _ACT_KV)
        v = constrain(v.transpose(0, 2, 1, 3), _ACT_KV)
        new_cache = None
        if layer_cache is not None:
            k, v = update_cache(layer_cache["k"], layer_cache["v"], k, v, cache_index)
            new_cache = {"k": k, "v": v}
        out = dot_product_attention(q, k, v, mask, impl=cfg.attention_impl)
        out = constrain(out, _ACT_HEADS)
        out = Projection((cfg.hidden_size,), ("heads", "head_dim", "embed"), in_axes=2,
                         use_bias=cfg.o_attention_bias, dtype=dtype, name="o_proj")(out)
        return constrain(out, _ACT), new_cache


class DecoderLayer(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        cfg = self.cfg
        x = constrain(x, _ACT)
        h, new_cache = Attention(cfg, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), cos, sin, mask, layer_cache, cache_index)
        x = x + h
        h = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype=as_dtype(cfg.dtype),
                fused=cfg.fused_mlp, name="mlp")(
            RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        return constrain(x + h, _ACT), new_cache


class Backbone(nn.Module):
    """Layers + final RMSNorm. ``__call__(x [B,T,E], positions [B,T], mask [B,1,T,S], cache, cache_index)``
    returns (hidden after the final norm, updated cache or None)."""

    cfg: object

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        cfg = self.cfg
        dtype = as_dtype(cfg.dtype)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
        x = x.astype(dtype)
        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            if cfg.remat_policy not in REMAT_POLICIES:
                raise ValueError(f"unknown remat_policy {cfg.remat_policy!r}; choose from "
                                 f"{['none', *REMAT_POLICIES]}")
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            x, new_cache = stack(x, cos, sin, mask, cache, cache_index)
        else:
            new_cache = None if cache is None else []
            for i in range(cfg.num_layers):
                x, c = layer_cls(cfg, name=f"layers_{i}")(x, cos, sin, mask, None if cache is None else cache[i],
                                                           cache_index)
                if cache is not None:
                    new_cache.append(c)
        return RMSNorm(cfg.rms_norm_eps, name="norm")(x), new_cache


def init_cache(cfg, batch: int, max_len: int):
    """Zeroed static KV cache in the compute dtype, in the layout ``Backbone`` expects for ``cfg``."""
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = as_dtype(cfg.dtype)
    if cfg.scan_layers:
        shape = (cfg.num_layers, *shape)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]
