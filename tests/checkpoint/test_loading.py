"""load_model / load_vae: release folders and converted checkpoints give the same params in every layout,
dtype and placement, computed independently from the mapping table; bad input fails loudly naming the
culprit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from malicious_checkpoint import malicious_vae_release

from nextstep_jax.checkpoint import (
    CheckpointError,
    load_model,
    load_vae,
    read_model_config,
    read_vae_config,
    release_files,
)
from nextstep_jax.checkpoint.conversion import import_release
from nextstep_jax.checkpoint.mapping import nextstep_table, to_flax, vae_table
from nextstep_jax.checkpoint.release.safetensors import SafetensorsReader, TensorSpec, write_safetensors
from nextstep_jax.models.layouts import unfuse_projections
from train_runs import environment

MESH_SCRIPT = Path(__file__).with_name("mesh_loading.py")


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
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def _reference(golden_dir, kind: str, scan_layers: bool = True) -> dict:
    """The release's params in numpy, leaf by leaf from the mapping table and the safetensors files alone."""
    folder = golden_dir / ("model" if kind == "nextstep" else "vae")
    with SafetensorsReader(folder if kind == "nextstep" else folder / "checkpoint.safetensors") as reader:
        cfg = read_model_config(folder) if kind == "nextstep" else read_vae_config(folder)
        cfg.scan_layers = scan_layers
        table = nextstep_table(cfg) if kind == "nextstep" else vae_table(cfg)
        layers: dict = {}
        for e in table:
            layers.setdefault(e.flax_path, {})[e.layer] = to_flax(e, reader.read(e.torch_key))
    flat = {p: v[None] if None in v else np.stack([v[i] for i in range(len(v))]) for p, v in layers.items()}
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    """golden/model imported with scanned and with per-layer leaves, and golden/vae."""
    root = tmp_path_factory.mktemp("converted")
    import_release(golden_dir / "model", root / "scanned", progress=False)
    import_release(golden_dir / "model", root / "unrolled", scan_layers=False, progress=False)
    import_release(golden_dir / "vae", root / "vae", progress=False)
    return root


def test_single_and_sharded_release_load_identically(golden_dir):
    cfg_a, a = load_model(golden_dir / "model")
    cfg_b, b = load_model(golden_dir / "model_sharded")
    assert cfg_a.to_dict() == cfg_b.to_dict()
    _assert_same_tree(a, b)


def test_model_prefix_is_accepted(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    folder = _release_copy(golden_dir, tmp_path, {f"model.{k}": v for k, v in tensors.items()})
    _assert_same_tree(load_model(folder)[1], load_model(golden_dir / "model")[1])


def test_missing_tensor_is_named(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    del tensors["layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors 'layers\.1\.mlp\.up_proj\.weight'"):
        load_model(_release_copy(golden_dir, tmp_path, tensors))


def test_unexpected_tensor_is_named(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    tensors["vision_tower.proj.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors 'vision_tower\.proj\.weight'"):
        load_model(_release_copy(golden_dir, tmp_path, tensors))


def test_wrong_shape_is_named(golden_dir, tmp_path):
    tensors = _tensors(golden_dir / "model")
    w = tensors["image_in_projector.weight"]
    tensors["image_in_projector.weight"] = np.zeros((w.shape[0], w.shape[1] + 1), w.dtype)
    with pytest.raises(CheckpointError, match=r"'image_in_projector\.weight' has shape .* expects"):
        load_model(_release_copy(golden_dir, tmp_path, tensors))


def test_missing_shard_is_named(golden_dir, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(golden_dir / "model_sharded", folder)
    victim = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(folder)


def test_truncated_file_is_named(golden_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(golden_dir / "model", folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_o_proj_bias_presence_decides(golden_dir, tmp_path):
    """An o_proj.bias in the weights is loaded even if the config says otherwise."""
    tensors = _tensors(golden_dir / "model")
    cfg, _ = load_model(golden_dir / "model")
    assert not cfg.o_attention_bias
    rng = np.random.default_rng(0)
    for i in range(cfg.num_layers):
        tensors[f"layers.{i}.self_attn.o_proj.bias"] = rng.standard_normal(cfg.hidden_size).astype(np.float32)
    cfg, params = load_model(_release_copy(golden_dir, tmp_path, tensors))
    assert cfg.o_attention_bias
    bias = params["backbone"]["layers"]["self_attn"]["o_proj"]["bias"]
    np.testing.assert_array_equal(np.asarray(bias)[1], tensors["layers.1.self_attn.o_proj.bias"])


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


@pytest.mark.parametrize("source", ["release", "scanned", "unrolled"])
@pytest.mark.parametrize("layers", ["scanned", "unrolled"])
def test_every_source_gives_the_reference_params_in_either_layer_layout(golden_dir, converted, source, layers):
    path = golden_dir / "model" if source == "release" else converted / source
    cfg, params = load_model(path, layers=layers)
    assert cfg.scan_layers == (layers == "scanned") and not cfg.fused_qkv and not cfg.fused_mlp
    assert cfg.num_layers == read_model_config(golden_dir / "model").num_layers
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    _assert_same_tree(params, _reference(golden_dir, "nextstep", scan_layers=layers == "scanned"))


@pytest.mark.parametrize("source", ["release", "scanned"])
def test_fused_loads_unfuse_to_the_reference(golden_dir, converted, source):
    path = golden_dir / "model" if source == "release" else converted / source
    for layers in ("scanned", "unrolled"):
        cfg, params = load_model(path, layers=layers, fused=True)
        assert cfg.fused_qkv and cfg.fused_mlp and cfg.scan_layers == (layers == "scanned")
        layer = params["backbone"]["layers" if layers == "scanned" else "layers_0"]
        assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"} and set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
        back_cfg, back = unfuse_projections(cfg, params)
        assert not back_cfg.fused_qkv
        _assert_same_tree(back, _reference(golden_dir, "nextstep", scan_layers=layers == "scanned"))


@pytest.mark.parametrize("source", ["release", "scanned"])
def test_dtype_casts_every_leaf(golden_dir, converted, source):
    path = golden_dir / "model" if source == "release" else converted / source
    cfg, params = load_model(path, dtype="bfloat16", layers="unrolled")
    assert cfg.dtype == "float32"  # the compute dtype stays the config's
    want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), _reference(golden_dir, "nextstep", scan_layers=False))
    _assert_same_tree(params, want)


def test_vae_from_release_and_converted(golden_dir, converted):
    want = _reference(golden_dir, "vae")
    for path in (golden_dir / "vae", converted / "vae"):
        cfg, params = load_vae(path)
        assert cfg.to_dict() == read_vae_config(golden_dir / "vae").to_dict()
        _assert_same_tree(params, want)
    half = jax.tree.map(lambda x: x.astype(np.float16), want)
    _assert_same_tree(load_vae(converted / "vae", dtype=np.float16)[1], half)


def test_configs_and_release_files_without_loading(golden_dir, converted):
    assert read_model_config(converted / "scanned").to_dict() == read_model_config(golden_dir / "model").to_dict()
    assert read_model_config(converted / "unrolled").scan_layers is False
    assert release_files(golden_dir / "model") == golden_dir / "model"
    assert (release_files(converted / "scanned") / "tokenizer.json").read_bytes() == \
        (golden_dir / "model" / "tokenizer.json").read_bytes()


def test_wrong_kind_or_path_is_named(golden_dir, converted, tmp_path):
    with pytest.raises(CheckpointError, match=f"{golden_dir / 'vae'}: holds a vae release, expected nextstep"):
        load_model(golden_dir / "vae")
    with pytest.raises(CheckpointError, match=f"{golden_dir / 'model'}: holds a nextstep release, expected vae"):
        load_vae(golden_dir / "model")
    with pytest.raises(CheckpointError, match="a converted vae checkpoint, expected nextstep"):
        read_model_config(converted / "vae")
    with pytest.raises(CheckpointError, match="a converted nextstep checkpoint, expected vae"):
        load_vae(converted / "scanned")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="layers must be one of"):
        load_model(golden_dir / "model", layers="stacked")


def test_mesh_loads_match_single_device_in_the_logical_shardings(golden_dir, converted):
    env = environment(8)
    out = subprocess.run([sys.executable, str(MESH_SCRIPT), str(golden_dir), str(converted)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result) == 8, list(result)
    for name, r in result.items():
        assert r["devices"] == 8, name
        assert not r["value_mismatch"] and not r["sharding_mismatch"] and not r["bad_shard_shape"], (name, r)
        # Most model leaves really are split; of the VAE, the convolutions' output channels.
        assert r["split_leaves"] >= (r["leaves"] * 3 // 4 if "vae" not in name else 1), (name, r)
    for source in ("release", "scanned"):
        assert result[f"{source} unrolled"]["q_spec"] == ["fsdp", "tensor", None]
        assert result[f"{source} scanned"]["q_spec"] == [None, "fsdp", "tensor", None]
        # fused q/k/v [embed, kv_heads, G+2, head_dim]: kv heads split over tensor
        assert result[f"{source} unrolled fused"]["q_spec"] == ["fsdp", "tensor", None, None]
