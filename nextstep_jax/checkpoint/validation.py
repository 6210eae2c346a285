"""How a release folder is checked against its config, strictly: ``config.json`` parsing, key spelling (the
optional ``model.`` prefix), the key set and every shape against the mapping table. Every key of the table must
be present with its exact shape, and every key of the file must be known (``IGNORED_TORCH_KEYS`` aside);
anything else is a ``CheckpointError`` naming the key and the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import ml_collections

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import IGNORED_TORCH_KEYS, Entry
from nextstep_jax.configs import replace

# Official files may prefix every key with "model." (REFERENCE §9.1); accept either spelling.
OPTIONAL_PREFIX = "model."

VAE_WEIGHT_FILES = ("checkpoint.safetensors", "checkpoint.pt")


def _list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def canonical_key(key: str) -> str:
    """The key without the optional ``model.`` prefix (the spelling the mapping table uses)."""
    return key[len(OPTIONAL_PREFIX):] if key.startswith(OPTIONAL_PREFIX) else key


def _key_resolver(file_keys: list[str]) -> dict[str, str]:
    """Canonical key -> key as spelled in the file."""
    resolved = {}
    for key in file_keys:
        canonical = canonical_key(key)
        if canonical in resolved:
            raise CheckpointError(f"tensor {canonical!r} appears both with and without the "
                                  f"{OPTIONAL_PREFIX!r} prefix")
        resolved[canonical] = key
    return resolved


def match_tensors(table: list[Entry], source: str, file_keys: list[str],
                  shape_of: Callable[[str], tuple[int, ...]]) -> dict[str, str]:
    """Check the key set and every shape against ``table``. Returns canonical key -> key as spelled in the
    file, for the table's tensors and the ``IGNORED_TORCH_KEYS`` present."""
    spelled = _key_resolver(file_keys)
    expected = {e.torch_key: e for e in table}
    missing = expected.keys() - spelled.keys()
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_list(missing)}")
    unexpected = spelled.keys() - expected.keys() - set(IGNORED_TORCH_KEYS)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {_list(unexpected)} (not part of this "
                              "architecture/config)")
    for key, entry in expected.items():
        shape = tuple(shape_of(spelled[key]))
        if shape != entry.torch_shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {shape}, config expects "
                                  f"{entry.torch_shape}")
    return spelled


def read_release_config(folder: str | Path, parse: Callable[[Path], ml_collections.ConfigDict]
                        ) -> ml_collections.ConfigDict:
    """``parse(folder/config.json)``, with every way the file can be wrong raised as a ``CheckpointError``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        return parse(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    except ValueError as e:  # unsupported architecture or schema, missing or invalid fields; names the file
        raise CheckpointError(str(e)) from e


def complete_config(cfg: ml_collections.ConfigDict, keys: list[str], *, scan_layers: bool
                    ) -> ml_collections.ConfigDict:
    """A copy of a release's model config with the layer layout and what only the tensor keys decide."""
    # REFERENCE §14 #14: whether o_proj has a bias is decided by the weights, not the config.
    return replace(cfg, scan_layers=scan_layers,
                   o_attention_bias=any(k.endswith("self_attn.o_proj.bias") for k in keys))


def vae_weights_file(folder: str | Path) -> Path:
    """The tokenizer release's weight file, ``checkpoint.safetensors`` preferred over ``checkpoint.pt``."""
    folder = Path(folder)
    weights = next((folder / n for n in VAE_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no VAE weights (looked for {', '.join(VAE_WEIGHT_FILES)})")
    return weights
