"""Loading release folders into Flax params: equivalences and loud failures naming the culprit."""

import shutil

import jax
import numpy as np
import pytest
from malicious_checkpoint import malicious_vae_release

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.load import load_nextstep, load_vae
from nextstep_jax.checkpoint.safetensors_io import SafetensorsReader, TensorSpec, write_safetensors


def _tensors(path):
    with SafetensorsReader(path) as r:
        return {k: r.read(k) for k in r.keys()}


def _release_copy(golden_dir, tmp_path, tensors):
    """A release folder with golden/model's config and the given tensors in one model.safetensors."""
    out = tmp_path / "release"
    out.mkdir()
    shutil.copy(golden_dir / "model" / "config.json", out / "config.json")
    write_safetensors(out / "model.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()])
    return out


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_single_and_sharded_release_load_identically(golden_dir):
    cfg_a, a = load_nextstep(golden_dir / "model")
    cfg_b, b = load_nextstep(golden_dir / "model_sharded")
    assert cfg_a.to_dict() == cfg_b.to_dict()
    _assert_same_tree(a, b)


def test_model_prefix_is_accepted(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    folder = _release_copy(golden_dir, tmp_path, {f"model.{k}": v for k, v in tensors.items()})
    _assert_same_tree(load_nextstep(folder)[1], load_nextstep(golden_dir / "model")[1])


def test_missing_tensor_is_named(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    del tensors["layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors 'layers\.1\.mlp\.up_proj\.weight'"):
        load_nextstep(_release_copy(golden_dir, tmp_path, tensors))


def test_unexpected_tensor_is_named(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    tensors["vision_tower.proj.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors 'vision_tower\.proj\.weight'"):
        load_nextstep(_release_copy(golden_dir, tmp_path, tensors))


def test_wrong_shape_is_named(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    w = tensors["image_in_projector.weight"]
    tensors["image_in_projector.weight"] = np.zeros((w.shape[0], w.shape[1] + 1), w.dtype)
    with pytest.raises(CheckpointError, match=r"'image_in_projector\.weight' has shape .* expects"):
        load_nextstep(_release_copy(golden_dir, tmp_path, tensors))


def test_missing_shard_is_named(golden_dir, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(golden_dir / "model_sharded", folder)
    victim = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_nextstep(folder)


def test_truncated_file_is_named(golden_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(golden_dir / "model", folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_nextstep(folder)


def test_o_proj_bias_presence_decides(golden_dir, tmp_path):
    """REFERENCE §14 #14: an o_proj.bias in the weights is loaded even if the config says otherwise."""
    tensors = _tensors(golden_dir / "model")
    cfg, _ = load_nextstep(golden_dir / "model")
    assert not cfg.o_attention_bias
    rng = np.random.default_rng(0)
    for i in range(cfg.num_layers):
        tensors[f"layers.{i}.self_attn.o_proj.bias"] = rng.standard_normal(cfg.hidden_size).astype(np.float32)
    cfg, params = load_nextstep(_release_copy(golden_dir, tmp_path, tensors))
    assert cfg.o_attention_bias
    bias = params["backbone"]["layers"]["self_attn"]["o_proj"]["bias"]
    np.testing.assert_array_equal(bias[1], tensors["layers.1.self_attn.o_proj.bias"])


def test_vae_pt_and_safetensors_load_identically(golden_dir, tmp_path):
    folder = tmp_path / "vae_pt"
    folder.mkdir()
    shutil.copy(golden_dir / "vae" / "config.json", folder)
    shutil.copy(golden_dir / "vae" / "checkpoint.pt", folder)
    cfg_pt, from_pt = load_vae(folder)
    cfg_st, from_st = load_vae(golden_dir / "vae")
    assert cfg_pt.to_dict() == cfg_st.to_dict()
    _assert_same_tree(from_pt, from_st)


def test_malicious_vae_pickle_is_rejected_without_running(golden_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = malicious_vae_release(tmp_path / "vae_evil", golden_dir, marker)
    with pytest.raises(CheckpointError, match=r"(posix|os)\.system.*checkpoint\.pt|checkpoint\.pt.*(posix|os)\.system"):
        load_vae(folder)
    assert not marker.exists()
