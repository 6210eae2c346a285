"""Mesh construction and the one table of logical-axis -> mesh-axis rules.

Every parameter and activation in the models carries logical axis names (MaxText style); only this file
knows how they map onto the physical mesh axes ``data``, ``fsdp``, ``tensor`` and ``sequence``.
"""

from __future__ import annotations

import contextlib
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
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        grid = _multi_slice_grid(sizes, devices, slices)
    else:
        grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _multi_slice_grid(sizes: dict[str, int], devices: list, slices: int) -> np.ndarray:
    """Devices of several slices (multi-slice TPU pods) with ``data`` spanning the slices: only the data-parallel
    gradient reduction then crosses the slow links between slices, every other axis stays inside one slice."""
    from jax.experimental import mesh_utils

    if sizes["data"] % slices:
        raise ValueError(f"mesh.data={sizes['data']} must be a multiple of the {slices} slices: the data axis "
                         f"spans the slices")
    inside = [sizes["data"] // slices] + [sizes[a] for a in MESH_AXES[1:]]
    across = [slices] + [1] * (len(MESH_AXES) - 1)
    return mesh_utils.create_hybrid_device_mesh(inside, across, devices)


def logical_to_mesh_spec(logical: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh_shape: dict[str, int]) -> PartitionSpec:
    """``spec`` with every mesh axis that does not divide its dimension dropped (that part replicated).

    The one policy for indivisible dimensions: e.g. 1 KV head on tensor=2 or a 307-token vocabulary stay
    whole on every device, as MaxText replicates KV heads below the tensor size. Axes of a dimension are
    kept from the left while their product divides it. Dimensions that must be split for a model to fit
    are refused earlier by ``validate_mesh``.
    """
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for axis in axes:
            if dim % (size * mesh_shape[axis]):
                break
            kept.append(axis)
            size *= mesh_shape[axis]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def sharding_for(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh,
                 rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """The NamedSharding of an array of ``shape`` whose axes have the ``logical`` names."""
    return NamedSharding(mesh, fit_spec(logical_to_mesh_spec(logical, rules), shape, dict(mesh.shape)))


def shardings_of(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a (possibly abstract) variable tree whose leaves are ``nn.Partitioned``; leaves
    without names are replicated."""
    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return sharding_for(leaf.value.shape, leaf.names, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names under ``use_mesh`` (unchanged outside one).

    Unlike ``nn.with_logical_constraint`` it knows the value's shape and applies ``fit_spec``, so a
    dimension its axes do not divide (a batch of 1, one KV head) is left whole instead of padded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = fit_spec(logical_to_mesh_spec(logical, rules), x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Leading (batch) axis split like ``activation_batch``; the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec(("activation_batch",), rules))


def batch_shards(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> int:
    """How many ways ``activation_batch`` splits the batch on ``mesh``."""
    spec = logical_to_mesh_spec(("activation_batch",), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


def validate_mesh(config, mesh, rules=LOGICAL_AXIS_RULES) -> None:
    """Refuse, before anything compiles, a config whose sharded dimensions the mesh does not divide.

    Checked: the dimensions the rules split and that must be split for a large model to fit or run in
    parallel (attention heads, MLP width, hidden sizes over fsdp, the global batch per microbatch over the
    batch axes, the sequence). Vocabulary and KV heads are exempt: ``fit_spec`` replicates them when
    indivisible. ``config`` has a ``model`` section and optionally ``data`` (batch_size, seq_len) and
    ``train_step`` (microbatches); ``mesh`` is a Mesh or AbstractMesh.
    """
    sizes = dict(mesh.shape)

    def axis_size(logical: str) -> tuple[str, int]:
        spec = logical_to_mesh_spec((logical,), rules)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return "x".join(axes) or "-", int(np.prod([sizes[a] for a in axes]))

    model = config.model
    checks = [
        ("model.num_heads", model.num_heads, "heads"),
        ("model.intermediate_size", model.intermediate_size, "mlp"),
        ("model.hidden_size", model.hidden_size, "embed"),
        ("model.fm_head_dim", model.fm_head_dim, "fm_embed"),
    ]
    data = config.get("data") or {}
    if data.get("batch_size") is not None:
        microbatches = int((config.get("train_step") or {}).get("microbatches", 1))
        if data["batch_size"] % microbatches:
            raise ValueError(f"data.batch_size={data['batch_size']} is not divisible by "
                             f"train_step.microbatches={microbatches}")
        rows = data["batch_size"] // microbatches
        name = "data.batch_size" if microbatches == 1 else "data.batch_size / train_step.microbatches"
        checks.append((name, rows, "activation_batch"))
    if data.get("seq_len") is not None:
        checks.append(("data.seq_len", data["seq_len"], "activation_length"))
    for field, value, logical in checks:
        axes, size = axis_size(logical)
        if value % size:
            raise ValueError(f"{field}={value} is not divisible by mesh axis {axes}={size} "
                             f"(logical axis {logical!r}); change the mesh or the config")


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The one mesh context: ``jax.set_mesh`` plus Flax's logical axis rules.

    Under it ``nn.with_logical_constraint`` takes effect; under the deprecated ``with mesh:`` Flax sees no
    global mesh and silently returns every value unconstrained.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh
