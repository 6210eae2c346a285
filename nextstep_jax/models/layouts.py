"""Parameter layouts as tree transforms: scanned <-> unrolled layers, separate <-> fused projections.

Two config choices say how the backbone's decoder layers are held (see ``configs.model_config``):

  ``scan_layers``              scanned: one ``backbone/layers`` subtree whose leaves stack the layers on a
                               leading [layers] axis (``nn.scan``: compile time independent of depth);
                               unrolled: one ``backbone/layers_{i}`` subtree per layer (decoding: a scanned
                               step slices every layer's weights out of the stacks, measured slower).
  ``fused_qkv``, ``fused_mlp``  separate q/k/v and gate/up projections (the release's and checkpoints'
                               layout), or fused ones (one weight read each per layer, for bandwidth-bound
                               decoding).

Fused q/k/v kernel [embed, KV, G+2, D]: for kv head j, the G query heads j·G … j·G+G-1 (the GQA grouping of
the release), then k_j, then v_j; biases [KV, G+2, D] alike. Fused gate/up kernel [embed, 2, mlp] (gate,
then up); biases [2, mlp]. Scanned layers carry their leading [layers] axis through the fusion unchanged.

Every transform takes and returns ``(config, params)``, the config saying the new layout, and works on
device in small jitted steps (one leaf or one layer; equal steps share one compilation), each input
dropped once converted, so the peak is the model plus one piece. ``mesh`` places the outputs in the target
layout's logical shardings; ``donate`` frees each input piece as soon as it is converted (the input tree
is unusable afterwards).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nextstep_jax.configs import replace
from nextstep_jax.models.nextstep import abstract_variables
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, shardings_of

__all__ = ["for_decoding", "fuse_projections", "scan_to_unrolled", "unfuse_projections", "unrolled_to_scan"]

Path = tuple[str, ...]
# (input paths, fn(*inputs) -> tuple of outputs, output paths); a path names a leaf or a subtree.
Step = tuple[tuple[Path, ...], Callable, tuple[Path, ...]]
Transformed = tuple[ml_collections.ConfigDict, Any]


def _get(tree: dict, path: Path):
    for name in path:
        tree = tree[name]
    return tree


def _pop(tree: dict, path: Path):
    """Remove and return ``tree[path]``, and the folders it leaves empty."""
    parent = _get(tree, path[:-1])
    value = parent.pop(path[-1])
    if not parent and len(path) > 1:
        _pop(tree, path[:-1])
    return value


def _put(tree: dict, path: Path, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _rewrite(cfg_to, params, steps: Sequence[Step], mesh, rules, donate: bool) -> dict:
    """The one relayout engine: ``params`` with each step applied in turn, jitted with the outputs in the
    shardings of ``cfg_to``'s model on ``mesh`` (None: where XLA puts them, the inputs' device)."""
    tree = jax.tree.map(lambda x: x, params)  # fresh containers: the caller's tree keeps its structure
    target = None if mesh is None else shardings_of(abstract_variables(cfg_to)["params"], mesh, rules)
    jitted: dict = {}
    with warnings.catch_warnings():
        # Donated inputs cannot alias differently shaped outputs; they are deleted below instead.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        for inputs, fn, outputs in steps:
            out = None if target is None else tuple(_get(target, p) for p in outputs)
            leaves, treedef = jax.tree.flatten(out)
            key = (fn, tuple(leaves), treedef)
            if key not in jitted:
                jitted[key] = jax.jit(fn, out_shardings=out, donate_argnums=tuple(range(len(inputs))) if donate else ())
            pieces = [_pop(tree, p) for p in inputs]
            results = jitted[key](*pieces)
            if donate:  # what XLA could not alias to an output is freed here, not when the caller lets go
                for leaf in jax.tree.leaves(pieces):
                    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                        leaf.delete()
            del pieces
            for path, value in zip(outputs, results):
                _put(tree, path, value)
    return tree


def _leaf_paths(tree: dict, prefix: Path = ()) -> list[Path]:
    return [prefix + tuple(k.key for k in keys) for keys, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _split(x, n: int):
    return tuple(x[i] for i in range(n))


def _stack(*xs):
    return (jnp.stack(xs),)


def scan_to_unrolled(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False) -> Transformed:
    """(config, params) with the stacked ``backbone/layers`` split into ``layers_{i}``, one leaf at a time;
    unrolled params come back as they are."""
    if not cfg.scan_layers:
        return cfg, params
    to = replace(cfg, scan_layers=False)
    split = functools.partial(_split, n=cfg.num_layers)
    steps = [((("backbone", "layers", *p),), split,
              tuple(("backbone", f"layers_{i}", *p) for i in range(cfg.num_layers)))
             for p in _leaf_paths(params["backbone"]["layers"])]
    return to, _rewrite(to, params, steps, mesh, rules, donate)


def unrolled_to_scan(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False) -> Transformed:
    """(config, params) with the ``layers_{i}`` stacked into ``backbone/layers``, one leaf at a time;
    scanned params come back as they are."""
    if cfg.scan_layers:
        return cfg, params
    to = replace(cfg, scan_layers=True)
    steps = [(tuple(("backbone", f"layers_{i}", *p) for i in range(cfg.num_layers)), _stack,
              (("backbone", "layers", *p),))
             for p in _leaf_paths(params["backbone"]["layers_0"])]
    return to, _rewrite(to, params, steps, mesh, rules, donate)


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


def _convert_layer(layer: dict, *, cfg_from, cfg_to) -> tuple[dict]:
    if cfg_from.fused_qkv != cfg_to.fused_qkv:
        if cfg_to.fused_qkv:
            _fuse_attention(layer["self_attn"], cfg_to.num_kv_heads)
        else:
            _unfuse_attention(layer["self_attn"], cfg_to.num_heads)
    if cfg_from.fused_mlp != cfg_to.fused_mlp:
        (_fuse_mlp if cfg_to.fused_mlp else _unfuse_mlp)(layer["mlp"])
    return (layer,)


def _set_fusion(cfg, params, fused: bool, mesh, rules, donate: bool) -> Transformed:
    to = replace(cfg, fused_qkv=fused, fused_mlp=fused)
    convert = functools.partial(_convert_layer, cfg_from=cfg, cfg_to=to)
    steps = [((("backbone", name),), convert, (("backbone", name),))
             for name in params["backbone"] if name == "layers" or name.startswith("layers_")]
    return to, _rewrite(to, params, steps, mesh, rules, donate)


def fuse_projections(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False) -> Transformed:
    """(config, params) with q/k/v and gate/up fused, one layer at a time; already fused parts stay."""
    return _set_fusion(cfg, params, True, mesh, rules, donate)


def unfuse_projections(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False) -> Transformed:
    """(config, params) in the separate (release) projection layout."""
    return _set_fusion(cfg, params, False, mesh, rules, donate)


def for_decoding(cfg, params, *, mesh=None, rules=LOGICAL_AXIS_RULES, donate: bool = False) -> Transformed:
    """(config, params) in the decode layout: layers unrolled, q/k/v and gate/up fused."""
    unrolled_cfg, unrolled = scan_to_unrolled(cfg, params, mesh=mesh, rules=rules, donate=donate)
    # Params unrolled here are ours to free, whatever the caller's ``donate``.
    return fuse_projections(unrolled_cfg, unrolled, mesh=mesh, rules=rules, donate=donate or cfg.scan_layers)
