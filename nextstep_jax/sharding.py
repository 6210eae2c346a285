"""Mesh construction and the one table of logical-axis -> mesh-axis rules.

Every parameter and activation in the models carries logical axis names (MaxText style); only this file
knows how they map onto the physical mesh axes ``data``, ``fsdp``, ``tensor`` and ``sequence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis names used across nextstep_jax.models. A name maps to None (replicated) or to mesh axes.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_token", None),
    ("cache_length", None),
    # backbone parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),  # fused q/k/v: the G query heads, k and v of one kv head
    ("gate_up", None),  # fused gate/up
    ("layers", None),
    ("projector", "tensor"),
    ("norm", None),
    # image path: 64-d tokens, flow-matching head
    ("token", None),
    ("fm_embed", "fsdp"),
    ("fm_mlp", "tensor"),
    ("fm_freq", None),
    ("fm_modulation", "tensor"),
    # VAE convolutions
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("vae_channels", None),
)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``MESH_AXES``; axes missing from ``shape`` get size 1, one axis may be -1 (the rest).

    Axis types are Auto (classic GSPMD propagation), chosen deliberately: our modules annotate with
    logical constraints rather than sharding-in-types.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {name: 1 for name in MESH_AXES}
    sizes.update(shape or {"fsdp": -1})
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[fill[0]] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, have {len(devices)}")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh_spec(logical: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def logical_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Map a pytree of logical PartitionSpecs (from ``nn.get_partition_spec``) to NamedShardings."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings_of(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a (possibly abstract) variable tree whose leaves are ``nn.Partitioned``."""
    return logical_shardings(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Leading (batch) axis split like ``activation_batch``; the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec(("activation_batch",), rules))
