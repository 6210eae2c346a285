"""Qwen2-style causal decoder: pre-norm layers stacked with ``nn.scan`` (one compiled layer) or unrolled,
optional ``nn.remat`` (``REMAT_POLICIES``, some offloading saved activations to host memory), and a static KV
cache for decoding.

The cache is an explicit pytree, not a Flax collection, holding post-RoPE keys: with scanned layers
``{"k", "v"}`` of shape [layers, B, KV, S, D]; unrolled, a list of per-layer ``{"k", "v"}`` [B, KV, S, D]
(no per-step restacking). The caller owns slot bookkeeping (write index, key validity) and passes a
``Masking``; the backbone picks the attention kernel once (``attention.select_kernel``) and builds that kernel's
inputs once for all layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from nextstep_jax.models.attention import Masking, attend, kernel_inputs, select_kernel, update_cache
from nextstep_jax.models.layers import MLP, Projection, RMSNorm, apply_rope, as_dtype, rope_tables
from nextstep_jax.sharding import constrain

# Activations a layer names for the policies below: q/k/v after RoPE, the attention output before o_proj.
SAVED_NAMES = ("qkv", "attention")
_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": None,  # keep only each layer's input, recompute the rest in the backward pass
    "dots": _cp.checkpoint_dots,
    "dots_with_no_batch_dims": _cp.checkpoint_dots_with_no_batch_dims,
    "nothing_saveable": _cp.nothing_saveable,
    "save_qkv_attention": _cp.save_only_these_names(*SAVED_NAMES),
    # Host offload (TPU/GPU: XLA moves the saved values to pinned host memory and back for the backward pass).
    "offload_qkv_attention": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=SAVED_NAMES, offload_src="device",
        offload_dst="pinned_host"),
    "offload_dots_with_no_batch_dims": _cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
}

_ACT = ("activation_batch", "activation_length", "activation_embed")
_ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_ACT_KV = ("activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")


class Attention(nn.Module):
    cfg: object
    kernel: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, attn_inputs, layer_cache, cache_index):
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
        q = checkpoint_name(constrain(apply_rope(q, cos, sin), _ACT_HEADS), "qkv")
        # Heads-major keys/values, the layout of the cache and of attention's inputs.
        k = checkpoint_name(constrain(apply_rope(k, cos, sin).transpose(0, 2, 1, 3), _ACT_KV), "qkv")
        v = checkpoint_name(constrain(v.transpose(0, 2, 1, 3), _ACT_KV), "qkv")
        new_cache = None
        if layer_cache is not None:
            k, v = update_cache(layer_cache["k"], layer_cache["v"], k, v, cache_index)
            new_cache = {"k": k, "v": v}
        out = attend(q, k, v, attn_inputs, self.kernel, block_q=cfg.attention_block_q,
                     block_kv=cfg.attention_block_kv)
        out = checkpoint_name(constrain(out, _ACT_HEADS), "attention")
        out = Projection((cfg.hidden_size,), ("heads", "head_dim", "embed"), in_axes=2,
                         use_bias=cfg.o_attention_bias, dtype=dtype, name="o_proj")(out)
        return constrain(out, _ACT), new_cache


class DecoderLayer(nn.Module):
    cfg: object
    kernel: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, attn_inputs, layer_cache, cache_index):
        cfg = self.cfg
        x = constrain(x, _ACT)
        h, new_cache = Attention(cfg, self.kernel, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), cos, sin, attn_inputs, layer_cache, cache_index)
        x = x + h
        h = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype=as_dtype(cfg.dtype),
                fused=cfg.fused_mlp, name="mlp")(
            RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        return constrain(x + h, _ACT), new_cache


class Backbone(nn.Module):
    """Layers + final RMSNorm. ``__call__(x [B,T,E], positions [B,T], masking: Masking, cache, cache_index)``
    returns (hidden after the final norm, updated cache or None)."""

    cfg: object

    @nn.compact
    def __call__(self, x, positions, masking: Masking, cache=None, cache_index=None):
        cfg = self.cfg
        dtype = as_dtype(cfg.dtype)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
        x = x.astype(dtype)
        kernel = select_kernel(cfg.attention_impl, decoding=cache is not None, dtype=dtype)
        attn_inputs = kernel_inputs(masking, kernel)
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
            )(cfg, kernel, name="layers")
            x, new_cache = stack(x, cos, sin, attn_inputs, cache, cache_index)
        else:
            new_cache = None if cache is None else []
            for i in range(cfg.num_layers):
                x, c = layer_cls(cfg, kernel, name=f"layers_{i}")(
                    x, cos, sin, attn_inputs, None if cache is None else cache[i], cache_index)
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
