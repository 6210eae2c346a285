"""Checkpoints of the official release and our converted ones: reading, writing, converting, loading.

    loading.py     load_model / load_vae: the one loading call (release folder or converted checkpoint)
    release/       the official PyTorch release: config.json, folders, safetensors, torch pickles
    converted/     our converted checkpoint: Orbax items + manifest (what ``convert import`` writes)
    conversion.py  import / export / inspect / verify (``python -m nextstep_jax.convert``)
    mapping.py     the one table between PyTorch keys and Flax paths
    tensor_view.py the one read-only tensor view every format is read through
    dtypes.py      the one dtype table

Training checkpoints (train state, resumption) are another matter: ``nextstep_jax.training.checkpointing``.
"""

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.loading import load_model, load_vae, read_model_config, read_vae_config, release_files

__all__ = ["CheckpointError", "load_model", "load_vae", "read_model_config", "read_vae_config", "release_files"]
