"""The convert CLI: on bad input exit code 2, one line naming the file and tensor, and no output left behind;
written files get the ordinary umask modes."""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from malicious_checkpoint import malicious_vae_release

from nextstep_jax.checkpoint.conversion import import_release
from nextstep_jax.checkpoint.converted import store
from nextstep_jax.checkpoint.release.safetensors import SafetensorsReader, TensorSpec, write_safetensors
from nextstep_jax.convert import main


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_bad_input(capsys, dest, *argv, match):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for pattern in match:
        assert pattern in lines[0], (pattern, lines[0])
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")], "temporary folder left"


def _copy(golden_dir, tmp_path, name):
    return shutil.copytree(golden_dir / name, tmp_path / f"{name}_copy")


def test_missing_shard(golden_dir, tmp_path, capsys):
    release = _copy(golden_dir, tmp_path, "model_sharded")
    (release / "model-00002-of-00002.safetensors").unlink()
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=["model-00002-of-00002.safetensors", "missing"])


def test_truncated_safetensors(golden_dir, tmp_path, capsys):
    release = _copy(golden_dir, tmp_path, "model")
    weights = release / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=[str(weights), "truncated"])


def test_tensor_shape_differs_from_config(golden_dir, tmp_path, capsys):
    release = _copy(golden_dir, tmp_path, "model")
    with SafetensorsReader(golden_dir / "model") as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    rows, cols = tensors["image_out_projector.weight"].shape
    tensors["image_out_projector.weight"] = np.zeros((rows, cols + 1), np.float32)
    write_safetensors(release / "model.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()])
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=["'image_out_projector.weight'", f"({rows}, {cols + 1})", f"config expects ({rows}, {cols})",
                             str(release)])


def test_config_disagrees_with_every_tensor(golden_dir, tmp_path, capsys):
    release = _copy(golden_dir, tmp_path, "model")
    config = json.loads((release / "config.json").read_text())
    config["intermediate_size"] += 32
    (release / "config.json").write_text(json.dumps(config))
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=["mlp.gate_proj.weight",
                             f"config expects ({config['intermediate_size']}, {config['hidden_size']})"])


@pytest.mark.parametrize("edit,match", [
    (lambda c: {**c, "model_type": "llama"}, ["unsupported architecture", "'llama'"]),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, ["missing required field 'hidden_size'"]),
])
def test_unknown_or_incomplete_config_schema(golden_dir, tmp_path, capsys, edit, match):
    release = _copy(golden_dir, tmp_path, "model")
    (release / "config.json").write_text(json.dumps(edit(json.loads((release / "config.json").read_text()))))
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=[str(release / "config.json"), *match])


def test_config_that_is_not_json(golden_dir, tmp_path, capsys):
    release = _copy(golden_dir, tmp_path, "model")
    (release / "config.json").write_text("{not json")
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=[str(release / "config.json"), "not valid JSON"])


def test_malicious_vae_pickle_is_never_executed(golden_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    release = malicious_vae_release(tmp_path / "vae_evil", golden_dir, marker)
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=[str(release / "checkpoint.pt"), "system", "refusing"])
    assert not marker.exists()
    _assert_bad_input(capsys, tmp_path / "x", "verify", release / "checkpoint.pt", golden_dir / "vae",
                      match=["checkpoint.pt", "refusing"])


def test_existing_destination_needs_overwrite(golden_dir, tmp_path, capsys):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    code, _, err = _run(capsys, "import", golden_dir / "vae", dest)
    assert code == 2 and "already exists" in err and (dest / "keep.txt").read_text() == "old"
    code, out, _ = _run(capsys, "import", golden_dir / "vae", dest, "--overwrite")
    with SafetensorsReader(golden_dir / "vae" / "checkpoint.safetensors") as reader:
        assert code == 0 and f"{len(reader.keys())} tensors" in out
    assert store.is_checkpoint(dest) and not (dest / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_damaged_checkpoint_fails_export_without_output(golden_dir, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    assert _run(capsys, "import", golden_dir / "model", checkpoint)[0] == 0
    # the data of the first params leaf (embed_tokens) goes missing
    for data in (checkpoint / "params" / "ocdbt.leaf_0" / "d").iterdir():
        data.unlink()
    _assert_bad_input(capsys, tmp_path / "out", "export", checkpoint, tmp_path / "out",
                      match=["embed_tokens/embedding"])
    _assert_bad_input(capsys, tmp_path / "out", "export", golden_dir / "model", tmp_path / "out",
                      match=["not a converted checkpoint"])


def test_failure_midway_leaves_nothing(golden_dir, tmp_path, monkeypatch):
    calls = []

    def fail_on_third(self, entry, array):
        calls.append(entry.torch_key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, entry, array)

    original = store.StoreWriter.write_param
    monkeypatch.setattr(store.StoreWriter, "write_param", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        import_release(golden_dir / "model", tmp_path / "out", progress=False)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_help_describes_every_subcommand(capsys):
    for command, option in [("import", "--dtype"), ("export", "--max-shard-size"), ("inspect", "--all"),
                            ("verify", "--atol")]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert option in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "nextstep_jax.convert", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and all(c in out.stdout for c in ("import", "export", "inspect", "verify"))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "a", "b", "--atol", "-1"])
    assert exit_info.value.code == 2


def test_mixed_dtypes_across_stacked_layers(golden_dir, tmp_path, capsys):
    release = _copy(golden_dir, tmp_path, "model")
    with SafetensorsReader(golden_dir / "model") as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    key = "layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key].astype(ml_dtypes.bfloat16)
    write_safetensors(release / "model.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()],
                      metadata={"format": "pt"})
    _assert_bad_input(capsys, tmp_path / "out", "import", release, tmp_path / "out",
                      match=[f"'{key}' is BF16", "stacked leaf", "--no-scan-layers"])
    # per-layer leaves keep each tensor's own dtype, and export gives the file back
    assert _run(capsys, "import", release, tmp_path / "out", "--no-scan-layers")[0] == 0
    assert _run(capsys, "export", tmp_path / "out", tmp_path / "back")[0] == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()


def test_vae_export_is_one_file(golden_dir, tmp_path, capsys):
    assert _run(capsys, "import", golden_dir / "vae", tmp_path / "vae")[0] == 0
    _assert_bad_input(capsys, tmp_path / "out", "export", tmp_path / "vae", tmp_path / "out", "--max-shard-size",
                      "1MB", match=["one checkpoint.safetensors"])


def test_written_files_get_the_umask_modes(golden_dir, tmp_path, capsys):
    """Files 0644 and folders 0755 under umask 022, like any file the user writes (no private temporaries),
    also from a read-only release."""
    release = _copy(golden_dir, tmp_path, "model")
    shutil.copytree(golden_dir / "vae", release / "vae")
    for path in [*release.rglob("*"), release]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    old = os.umask(0o022)
    try:
        assert _run(capsys, "import", release, tmp_path / "ckpt")[0] == 0
        assert _run(capsys, "export", tmp_path / "ckpt", tmp_path / "back", "--max-shard-size", "500KB")[0] == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "ckpt", tmp_path / "back"):
        paths = [root, *root.rglob("*")]
        assert len(paths) > 5
        for path in paths:
            assert oct(path.stat().st_mode & 0o777) == ("0o755" if path.is_dir() else "0o644"), path
