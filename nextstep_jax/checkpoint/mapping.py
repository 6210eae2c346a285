"""The ONE table between PyTorch state-dict keys and Flax parameter paths.

Every tensor of a release is one ``Entry``: its PyTorch key and shape, its Flax path and shape, and a
layout ``kind``. Loading (``params_from_tensors``), export (``tensors_from_params``) and the gradient
parity tests all walk the same table, so a key can never be mapped two different ways.

Kinds (torch -> flax; the inverse is implied):
  copy    reshape only (embeddings, norm scales, biases; [H*D] -> [H, D] for per-head biases)
  linear  nn.Linear weight [out, in] -> kernel [in, out], then reshaped (e.g. [E, H, D] for q_proj)
  conv    nn.Conv2d weight [O, I, kh, kw] -> kernel [kh, kw, I, O]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

KINDS = ("copy", "linear", "conv")

# Persistent buffers present in official files that carry no trainable state (gen_pos_embed: disabled in
# every release).
IGNORED_TORCH_KEYS = ("gen_pos_embed",)


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    flax_path: tuple[str, ...]
    kind: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    layer: int | None = None  # index into a scanned [layers, ...] Flax array

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.torch_key}: unknown mapping kind {self.kind!r}")
        if int(np.prod(self.torch_shape)) != int(np.prod(self.flax_shape)):
            raise ValueError(f"{self.torch_key}: torch shape {self.torch_shape} and flax shape "
                             f"{self.flax_shape} differ in size")


def _to_flax_axes(entry: Entry, array: np.ndarray) -> np.ndarray:
    """The torch array with its axes in Flax order (a transposed view; not yet reshaped)."""
    if tuple(array.shape) != entry.torch_shape:
        raise ValueError(f"{entry.torch_key}: expected shape {entry.torch_shape}, got {tuple(array.shape)}")
    if entry.kind == "linear":
        return array.T
    if entry.kind == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def to_flax(entry: Entry, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_to_flax_axes(entry, array)).reshape(entry.flax_shape)


def flax_view(entry: Entry, torch_array: np.ndarray) -> np.ndarray:
    """``to_flax`` without the copy: a view of a C-contiguous torch-layout array, so blocks of the Flax
    layout can be cut out of (or written into) it one at a time."""
    view = _to_flax_axes(entry, torch_array).reshape(entry.flax_shape)
    if view.size and not np.may_share_memory(view, torch_array):
        raise ValueError(f"{entry.torch_key}: {entry.kind} layout of a non-contiguous array needs a copy")
    return view


def to_torch(entry: Entry, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if tuple(array.shape) != entry.flax_shape:
        raise ValueError(f"{'/'.join(entry.flax_path)}: expected shape {entry.flax_shape}, "
                         f"got {tuple(array.shape)}")
    if entry.kind == "linear":
        out_dim, in_dim = entry.torch_shape
        return np.ascontiguousarray(array.reshape(in_dim, out_dim).T)
    if entry.kind == "conv":
        o, i, kh, kw = entry.torch_shape
        return np.ascontiguousarray(array.reshape(kh, kw, i, o).transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array).reshape(entry.torch_shape)


def params_from_tensors(table: list[Entry], get_tensor: Callable[[str], np.ndarray],
                        place: Callable[[tuple[str, ...], np.ndarray], Any] = lambda path, array: array) -> dict:
    """Nested Flax param dict from ``get_tensor(torch_key)``, one leaf at a time: scanned layers are stacked
    along a new axis 0, and ``place(path, leaf)`` (e.g. onto a device) receives each finished leaf before the
    next is read, so only one leaf is ever held on the host."""
    leaves: dict[tuple[str, ...], list[Entry]] = {}
    for e in table:
        leaves.setdefault(e.flax_path, []).append(e)
    params: dict = {}
    for path, entries in leaves.items():
        if entries[0].layer is None:
            value = to_flax(entries[0], get_tensor(entries[0].torch_key))
        else:
            value = None
            for e in entries:
                layer = to_flax(e, get_tensor(e.torch_key))
                if value is None:
                    value = np.empty((max(x.layer for x in entries) + 1, *e.flax_shape), layer.dtype)
                value[e.layer] = layer
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = place(path, value)
    return params


def get_path(params: Mapping, path: tuple[str, ...]):
    node = params
    for i, name in enumerate(path):
        try:
            node = node[name]
        except (KeyError, TypeError):
            raise KeyError(f"Flax params have no {'/'.join(path[: i + 1])}") from None
    return node


def tensors_from_params(table: list[Entry], params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """(torch_key, tensor) in table order, one at a time (streaming export)."""
    for e in table:
        value = get_path(params, e.flax_path)
        if e.layer is not None:
            value = value[e.layer]
        yield e.torch_key, to_torch(e, np.asarray(value))


# --------------------------------------------------------------------------- NextStep (backbone + heads)


def _linear(key: str, path: tuple[str, ...], in_dim: int, out_dim: int, *, flax_kernel=None,
            bias: bool = True, flax_bias=None, layer: int | None = None) -> list[Entry]:
    entries = [Entry(f"{key}.weight", (*path, "kernel"), "linear", (out_dim, in_dim),
                     tuple(flax_kernel or (in_dim, out_dim)), layer)]
    if bias:
        entries.append(Entry(f"{key}.bias", (*path, "bias"), "copy", (out_dim,), tuple(flax_bias or (out_dim,)),
                             layer))
    return entries


def _decoder_layer(cfg, i: int) -> list[Entry]:
    e, h, kv, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    if cfg.scan_layers:
        base, layer = ("backbone", "layers"), i
    else:
        base, layer = ("backbone", f"layers_{i}"), None
    t = f"layers.{i}"
    out = [Entry(f"{t}.input_layernorm.weight", (*base, "input_layernorm", "scale"), "copy", (e,), (e,), layer)]
    attn = (*base, "self_attn")
    out += _linear(f"{t}.self_attn.q_proj", (*attn, "q_proj"), e, h * d, flax_kernel=(e, h, d),
                   bias=cfg.attention_bias, flax_bias=(h, d), layer=layer)
    for name in ("k_proj", "v_proj"):
        out += _linear(f"{t}.self_attn.{name}", (*attn, name), e, kv * d, flax_kernel=(e, kv, d),
                       bias=cfg.attention_bias, flax_bias=(kv, d), layer=layer)
    out += _linear(f"{t}.self_attn.o_proj", (*attn, "o_proj"), h * d, e, flax_kernel=(h, d, e),
                   bias=cfg.o_attention_bias, layer=layer)
    out.append(Entry(f"{t}.post_attention_layernorm.weight", (*base, "post_attention_layernorm", "scale"),
                     "copy", (e,), (e,), layer))
    for name, i_dim, o_dim in (("gate_proj", e, m), ("up_proj", e, m), ("down_proj", m, e)):
        out += _linear(f"{t}.mlp.{name}", (*base, "mlp", name), i_dim, o_dim, bias=cfg.mlp_bias, layer=layer)
    return out


def fm_head_table(cfg, torch_prefix: str = "image_head.net", flax_prefix: tuple[str, ...] = ("image_head",)
                  ) -> list[Entry]:
    """SimpleMLPAdaLN (release keys ``image_head.net.*``)."""
    tok = cfg.latent_channels * cfg.latent_patch_size ** 2
    dim, mlp = cfg.fm_head_dim, int(cfg.fm_head_dim * cfg.fm_head_mlp_ratio)
    p, f = torch_prefix, flax_prefix
    out = _linear(f"{p}.time_embed.mlp.0", (*f, "time_embed", "mlp_0"), 256, dim)
    out += _linear(f"{p}.time_embed.mlp.2", (*f, "time_embed", "mlp_2"), dim, dim)
    out += _linear(f"{p}.cond_embed", (*f, "cond_embed"), cfg.hidden_size, dim)
    out += _linear(f"{p}.input_proj", (*f, "input_proj"), tok, dim)
    for j in range(cfg.fm_head_layers):
        rb, fb = f"{p}.res_blocks.{j}", (*f, f"res_blocks_{j}")
        out += [Entry(f"{rb}.in_ln.weight", (*fb, "in_ln", "scale"), "copy", (dim,), (dim,)),
                Entry(f"{rb}.in_ln.bias", (*fb, "in_ln", "bias"), "copy", (dim,), (dim,))]
        out += _linear(f"{rb}.mlp.0", (*fb, "mlp_0"), dim, mlp)
        out += _linear(f"{rb}.mlp.2", (*fb, "mlp_2"), mlp, dim)
        out += _linear(f"{rb}.adaLN_modulation.1", (*fb, "adaLN_modulation_1"), dim, 3 * dim)
    out += _linear(f"{p}.final_layer.linear", (*f, "final_layer", "linear"), dim, tok)
    out += _linear(f"{p}.final_layer.adaLN_modulation.1", (*f, "final_layer", "adaLN_modulation_1"), dim, 2 * dim)
    return out


def nextstep_table(cfg) -> list[Entry]:
    """Every tensor of a NextStep release, in the official state_dict order."""
    if cfg.get("fused_qkv") or cfg.get("fused_mlp"):
        raise ValueError("the release layout has separate q/k/v and gate/up projections: convert fused params "
                         "with models.layouts.unfuse_projections before mapping them to PyTorch keys")
    e, v = cfg.hidden_size, cfg.vocab_size
    tok = cfg.latent_channels * cfg.latent_patch_size ** 2
    out = [Entry("embed_tokens.weight", ("embed_tokens", "embedding"), "copy", (v, e), (v, e))]
    for i in range(cfg.num_layers):
        out += _decoder_layer(cfg, i)
    out.append(Entry("norm.weight", ("backbone", "norm", "scale"), "copy", (e,), (e,)))
    out += _linear("image_in_projector", ("image_in_projector",), tok, e)
    out += _linear("image_out_projector", ("image_out_projector",), e, e)
    out += fm_head_table(cfg)
    if not cfg.tie_word_embeddings:
        out += _linear("lm_head", ("lm_head",), e, v, bias=False)
    return out


# --------------------------------------------------------------------------- VAE (Flux-style AutoencoderKL)


def _vae_conv(key: str, path: tuple[str, ...], c_in: int, c_out: int, k: int) -> list[Entry]:
    return [Entry(f"{key}.weight", (*path, "kernel"), "conv", (c_out, c_in, k, k), (k, k, c_in, c_out)),
            Entry(f"{key}.bias", (*path, "bias"), "copy", (c_out,), (c_out,))]


def _vae_norm(key: str, path: tuple[str, ...], c: int) -> list[Entry]:
    return [Entry(f"{key}.weight", (*path, "scale"), "copy", (c,), (c,)),
            Entry(f"{key}.bias", (*path, "bias"), "copy", (c,), (c,))]


def _vae_resnet(key: str, path: tuple[str, ...], c_in: int, c_out: int) -> list[Entry]:
    out = _vae_norm(f"{key}.norm1", (*path, "norm1"), c_in)
    out += _vae_conv(f"{key}.conv1", (*path, "conv1"), c_in, c_out, 3)
    out += _vae_norm(f"{key}.norm2", (*path, "norm2"), c_out)
    out += _vae_conv(f"{key}.conv2", (*path, "conv2"), c_out, c_out, 3)
    if c_in != c_out:
        out += _vae_conv(f"{key}.nin_shortcut", (*path, "nin_shortcut"), c_in, c_out, 1)
    return out


def _vae_mid(key: str, path: tuple[str, ...], c: int) -> list[Entry]:
    out = _vae_resnet(f"{key}.block_1", (*path, "block_1"), c, c)
    attn, fattn = f"{key}.attn_1", (*path, "attn_1")
    out += _vae_norm(f"{attn}.norm", (*fattn, "norm"), c)
    for name in ("q", "k", "v", "proj_out"):
        out += _vae_conv(f"{attn}.{name}", (*fattn, name), c, c, 1)
    return out + _vae_resnet(f"{key}.block_2", (*path, "block_2"), c, c)


def vae_table(cfg) -> list[Entry]:
    """Every tensor of the VAE ``checkpoint.pt`` (Flux/LDM key names), in PyTorch registration order."""
    # The level wiring lives with the model so the table and the modules cannot disagree.
    from nextstep_jax.models.vae import decoder_blocks, encoder_blocks

    out = _vae_conv("encoder.conv_in", ("encoder", "conv_in"), cfg.in_channels, cfg.ch, 3)
    for i, (blocks, down) in enumerate(encoder_blocks(cfg)):
        for j, (c_in, c_out) in enumerate(blocks):
            out += _vae_resnet(f"encoder.down.{i}.block.{j}", ("encoder", f"down_{i}", f"block_{j}"), c_in, c_out)
        if down:
            c = blocks[-1][1]
            out += _vae_conv(f"encoder.down.{i}.downsample.conv", ("encoder", f"down_{i}", "downsample", "conv"),
                             c, c, 3)
    top = cfg.ch * cfg.ch_mult[-1]
    out += _vae_mid("encoder.mid", ("encoder", "mid"), top)
    out += _vae_norm("encoder.norm_out", ("encoder", "norm_out"), top)
    out += _vae_conv("encoder.conv_out", ("encoder", "conv_out"), top, 2 * cfg.z_channels, 3)

    out += _vae_conv("decoder.conv_in", ("decoder", "conv_in"), cfg.z_channels, top, 3)
    out += _vae_mid("decoder.mid", ("decoder", "mid"), top)
    for i, (blocks, up) in enumerate(decoder_blocks(cfg)):
        for j, (c_in, c_out) in enumerate(blocks):
            out += _vae_resnet(f"decoder.up.{i}.block.{j}", ("decoder", f"up_{i}", f"block_{j}"), c_in, c_out)
        if up:
            c = blocks[-1][1]
            out += _vae_conv(f"decoder.up.{i}.upsample.conv", ("decoder", f"up_{i}", "upsample", "conv"), c, c, 3)
    c_last = cfg.ch * cfg.ch_mult[0]
    out += _vae_norm("decoder.norm_out", ("decoder", "norm_out"), c_last)
    out += _vae_conv("decoder.conv_out", ("decoder", "conv_out"), c_last, cfg.out_ch, 3)
    return out


def table_for(kind: str, cfg) -> list[Entry]:
    """The table of a checkpoint ``kind``: "nextstep" (model) or "vae" (tokenizer)."""
    if kind not in ("nextstep", "vae"):
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    return nextstep_table(cfg) if kind == "nextstep" else vae_table(cfg)
