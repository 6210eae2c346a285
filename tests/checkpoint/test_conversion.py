"""Release -> converted checkpoint -> release round trips on the golden releases, verify and inspect."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from nextstep_jax.checkpoint.conversion import (
    export_release,
    format_inspection,
    import_release,
    inspect_checkpoint,
    parse_size,
    verify_checkpoints,
)
from nextstep_jax.checkpoint.converted.store import MANIFEST_FILE, ConvertedView
from nextstep_jax.checkpoint.release.safetensors import (
    INDEX_FILE_NAME,
    SafetensorsReader,
    TensorSpec,
    write_safetensors,
)
from nextstep_jax.convert import main


def _tensors(folder):
    with SafetensorsReader(folder) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def _assert_same_tensors(got: dict, want: dict):
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape, key
        assert got[key].tobytes() == array.tobytes(), key


def _vae_pt_release(golden_dir, folder):
    folder.mkdir()
    shutil.copy(golden_dir / "vae" / "config.json", folder)
    shutil.copy(golden_dir / "vae" / "checkpoint.pt", folder)
    return folder


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    """Each golden release imported once: name -> (release folder, converted checkpoint)."""
    root = tmp_path_factory.mktemp("converted")
    releases = {
        "model": (golden_dir / "model", {}),
        "model_sharded": (golden_dir / "model_sharded", {"scan_layers": False}),
        "vae": (golden_dir / "vae", {}),
        "vae_pt": (_vae_pt_release(golden_dir, root / "vae_pt_release"), {}),
    }
    out = {}
    for name, (release, options) in releases.items():
        import_release(release, root / name, progress=False, **options)
        out[name] = (release, root / name)
    return out


@pytest.mark.parametrize("name", ["model", "model_sharded"])
def test_model_round_trip_reproduces_the_release_files(converted, tmp_path, name):
    release, checkpoint = converted[name]
    export_release(checkpoint, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in release.iterdir())
    _assert_same_tensors(_tensors(tmp_path / "out"), _tensors(release))
    assert "gen_pos_embed" in _tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((release / "config.json").read_text())
    for path in release.iterdir():  # library-written files come back byte for byte, index included
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("name", ["vae", "vae_pt"])
def test_vae_round_trip_writes_safetensors_with_the_original_keys(converted, golden_dir, tmp_path, name):
    _, checkpoint = converted[name]
    export_release(checkpoint, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint.safetensors", "config.json"]
    got = safetensors.numpy.load_file(tmp_path / "out" / "checkpoint.safetensors")
    _assert_same_tensors(got, safetensors.numpy.load_file(golden_dir / "vae" / "checkpoint.safetensors"))
    assert (json.loads((tmp_path / "out" / "config.json").read_text())
            == json.loads((golden_dir / "vae" / "config.json").read_text()))
    assert verify_checkpoints(tmp_path / "out", golden_dir / "vae" / "checkpoint.pt") == []


def test_a_model_release_carries_its_vae_through_import_export_and_verify(golden_dir, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(golden_dir / "model", release)
    shutil.copytree(golden_dir / "vae", release / "vae")
    report = import_release(release, tmp_path / "ckpt", progress=False)
    vae_tensors = safetensors.numpy.load_file(golden_dir / "vae" / "checkpoint.safetensors")
    assert report.tensors == len(_tensors(golden_dir / "model")) + len(vae_tensors) and report.skipped == ()
    assert ConvertedView(tmp_path / "ckpt" / "vae").manifest.kind == "vae"
    assert not (tmp_path / "ckpt" / "release" / "vae").exists()
    assert verify_checkpoints(release, tmp_path / "ckpt") == []
    export_release(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / "vae").iterdir()) == ["checkpoint.safetensors", "config.json"]
    _assert_same_tensors(safetensors.numpy.load_file(tmp_path / "out" / "vae" / "checkpoint.safetensors"), vae_tensors)
    assert verify_checkpoints(tmp_path / "out", release) == []
    assert verify_checkpoints(golden_dir / "model", tmp_path / "ckpt") == [f"vae/: only in {tmp_path / 'ckpt'}"]


def test_resharding_and_single_file_exports(converted, tmp_path):
    release, checkpoint = converted["model"]
    want = _tensors(release)
    export_release(checkpoint, tmp_path / "many", max_shard_size=parse_size("200KB"), progress=False)
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "many" / INDEX_FILE_NAME).is_file()
    _assert_same_tensors(_tensors(tmp_path / "many"), want)
    sharded_release, sharded = converted["model_sharded"]
    export_release(sharded, tmp_path / "one", max_shard_size=parse_size("1GB"), progress=False)
    assert not (tmp_path / "one" / INDEX_FILE_NAME).exists()
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()


def test_bfloat16_import_keeps_buffers_and_exports_release_dtypes(golden_dir, tmp_path):
    import_release(golden_dir / "model", tmp_path / "bf16", dtype="bfloat16", progress=False)
    with ConvertedView(tmp_path / "bf16") as stored:
        assert stored.dtype("layers.0.mlp.up_proj.weight") == ml_dtypes.bfloat16
        assert stored.dtype("gen_pos_embed") == np.float32
    differences = verify_checkpoints(golden_dir / "model", tmp_path / "bf16")
    assert differences and "dtype F32 vs BF16" in differences[0]
    assert verify_checkpoints(golden_dir / "model", tmp_path / "bf16", atol=0.05) == []
    export_release(tmp_path / "bf16", tmp_path / "f32", progress=False)
    got, want = _tensors(tmp_path / "f32"), _tensors(golden_dir / "model")
    assert {a.dtype for a in got.values()} == {np.dtype(np.float32)}
    assert got["gen_pos_embed"].tobytes() == want["gen_pos_embed"].tobytes()
    key = "layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[key], want[key].astype(ml_dtypes.bfloat16).astype(np.float32))
    export_release(tmp_path / "bf16", tmp_path / "bf16_out", dtype="bfloat16", progress=False)
    assert json.loads((tmp_path / "bf16_out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _tensors(tmp_path / "bf16_out")[key].dtype == ml_dtypes.bfloat16


def test_model_prefix_spelling_survives(golden_dir, tmp_path):
    release = tmp_path / "prefixed"
    release.mkdir()
    shutil.copy(golden_dir / "model" / "config.json", release)
    tensors = {f"model.{k}": v for k, v in _tensors(golden_dir / "model").items()}
    write_safetensors(release / "model.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()],
                      metadata={"format": "pt"})
    import_release(release, tmp_path / "ckpt", progress=False)
    export_release(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()


def test_verify_equal_and_perturbed(converted, golden_dir, tmp_path, capsys):
    release, checkpoint = converted["model"]
    assert verify_checkpoints(release, checkpoint) == []
    assert verify_checkpoints(golden_dir / "model_sharded", converted["model_sharded"][1]) == []
    assert main(["verify", str(release), str(checkpoint)]) == 0

    tensors = _tensors(release)
    key = "layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 5] += 1e-3
    perturbed = tmp_path / "perturbed"
    shutil.copytree(release, perturbed)
    write_safetensors(perturbed / "model.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()],
                      metadata={"format": "pt"})
    differences = verify_checkpoints(checkpoint, perturbed)
    assert len(differences) == 1 and differences[0].startswith(f"{key}: differs at [3, 5]"), differences
    assert verify_checkpoints(checkpoint, perturbed, atol=2e-3) == []
    capsys.readouterr()
    assert main(["verify", str(checkpoint), str(perturbed)]) == 1
    assert key in capsys.readouterr().out

    del tensors["norm.weight"]
    write_safetensors(tmp_path / "fewer.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()])
    assert f"norm.weight: only in {checkpoint}" in verify_checkpoints(checkpoint, tmp_path / "fewer.safetensors")


def test_inspect(converted, golden_dir, capsys):
    release, checkpoint = converted["model"]
    summary = inspect_checkpoint(checkpoint)
    assert summary["kind"] == "nextstep" and summary["schema"] == "1.0"
    assert summary["format"].startswith("converted checkpoint")
    assert summary["num_tensors"] == len(_tensors(release))
    assert summary["total_bytes"] == sum(a.nbytes for a in _tensors(release).values())
    assert summary["buffers"] == ["gen_pos_embed"]
    assert summary["num_parameters"] == sum(a.size for k, a in _tensors(release).items() if k != "gen_pos_embed")
    assert inspect_checkpoint(release)["tensors"] == summary["tensors"]
    config = json.loads((release / "config.json").read_text())
    text = format_inspection(summary)
    assert f"layers.*.mlp.down_proj.weight x{config['num_hidden_layers']}" in text
    assert str([config["hidden_size"], config["intermediate_size"]]) in text
    assert "embed_tokens.weight" in text and "schema 1.0" in text
    vae = inspect_checkpoint(golden_dir / "vae" / "checkpoint.pt")
    vae_tensors = safetensors.numpy.load_file(golden_dir / "vae" / "checkpoint.safetensors")
    assert vae["kind"] is None and vae["num_tensors"] == len(vae_tensors)
    assert main(["inspect", str(converted["vae"][1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "vae"


def test_manifest_and_release_files(converted):
    release, checkpoint = converted["model_sharded"]
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "nextstep" and manifest["config"]["scan_layers"] is False
    assert {t["file"] for t in manifest["tensors"]} == {"model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"}
    assert [t["key"] for t in manifest["tensors"] if t["extra"]] == ["gen_pos_embed"]
    assert (checkpoint / "release" / "config.json").read_bytes() == (release / "config.json").read_bytes()
    assert (checkpoint / "release" / "tokenizer.json").is_file()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("1234") == 1234
    assert parse_size("1.5mb") == 1_500_000
    for bad in ("", "5XB", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
