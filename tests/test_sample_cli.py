"""`python -m nextstep_jax.sample` on the golden release folders: reproducible files with their metadata,
and bad input refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.checkpoint.conversion import import_release
from nextstep_jax.sample import main


@pytest.fixture(scope="module")
def side(golden_dir) -> int:
    """Two token-grid cells per side: a tiny image keeps each run to about its compilation."""
    vae = json.loads((golden_dir / "vae" / "config.json").read_text())
    model = json.loads((golden_dir / "model" / "config.json").read_text())
    return 2 * 2 ** (len(vae["ch_mult"]) - 1) * model.get("latent_patch_size", model.get("patch_size"))


@pytest.fixture(scope="module")
def base_args(golden_dir, side):
    return ["--model", str(golden_dir / "model"), "--vae", str(golden_dir / "vae"), "--hw", f"{side},{side}",
            "--steps", "2", "--cfg", "3.0", "--negative-prompt", "blurry", "--no-progress"]


def _run(base_args, out, *extra):
    return main([*base_args, "--out", str(out), *extra])


def test_same_seed_same_bytes_with_metadata(tmp_path, base_args, side, capsys):
    args = ["--prompt", "A red fox sitting in the snow.", "--num-images", "2", "--grid"]
    umask = os.umask(0o022)
    try:
        assert _run(base_args, tmp_path / "a", *args, "--seed", "5") == 0
    finally:
        os.umask(umask)
    printed = capsys.readouterr().out.split()
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert _run(base_args, tmp_path / "b", *args, "--seed", "5") == 0
    assert _run(base_args, tmp_path / "c", *args, "--seed", "6") == 0

    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(pngs) == 3 and any(name.endswith("_grid.png") for name in pngs)
    assert sorted(str(tmp_path / "a" / n) for n in pngs) == sorted(printed)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.json")) == [n.replace(".png", ".json") for n in pngs]
    for name in pngs:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first = sorted(tmp_path.glob("a/*_0.png"))[0]
    assert first.read_bytes() != (tmp_path / "c" / first.name.replace("_s5_", "_s6_")).read_bytes()

    with Image.open(first) as img:
        assert img.size == (side, side) and img.text["prompt"] == "A red fox sitting in the snow."
        settings = json.loads(img.text["settings"])
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar == settings
    assert (sidecar["seed"], sidecar["cfg"], sidecar["num_steps"], sidecar["sample"]) == (5, 3.0, 2, 0)
    (grid_png,) = (tmp_path / "a").glob("*_grid.png")
    with Image.open(grid_png) as img:
        grid_text = dict(img.text)
        grid_settings = json.loads(grid_text.pop("settings"))
    with Image.open(first) as img:
        assert grid_text.keys() == img.text.keys() - {"settings"} and grid_text["prompt"] == img.text["prompt"]
    assert grid_settings == json.loads(grid_png.with_suffix(".json").read_text())
    assert grid_settings == {**sidecar, "sample": [0, 1]}


def _without_vae(base_args):
    i = base_args.index("--vae")
    return [*base_args[:i], *base_args[i + 2:]]


def test_edit_with_text_from_prompts_file_and_a_converted_checkpoint(tmp_path, golden_dir, base_args):
    """Editing with one flow-matching step, a text span decoded before the image, the model as an Orbax
    checkpoint written by nextstep_jax.convert from a release holding its VAE in vae/ (converted along, found
    without --vae; tokenizer from its release/)."""
    release = tmp_path / "release"
    shutil.copytree(golden_dir / "model", release)
    shutil.copytree(golden_dir / "vae", release / "vae")
    import_release(release, tmp_path / "ckpt", progress=False)
    converted = [*_without_vae(base_args), "--model", str(tmp_path / "ckpt"), "--steps", "1"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "<image>Add a hat.", "image": "in.png",
                                                  "name": "hat"}) + "\n")
    assert _run(converted, tmp_path / "out", "--prompts-file", str(tmp_path / "p.jsonl"), "--cfg-img", "1.5",
                "--config.sampling.text_tokens=3", "--config.sampling.temperature", "0.7") == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert "hat" in png.name
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["image"] == str((tmp_path / "in.png").resolve()) and isinstance(sidecar["generated_text"], str)
    assert sidecar["num_steps"] == 1 and sidecar["vae"] == str((tmp_path / "ckpt" / "vae").resolve())


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "<image>a", "--image", "{tmp}/missing.png"], "does not exist"),
    (["--prompt", "<image>a", "--image", "{tmp}/garbage.png"], "cannot decode"),
    (["--prompt", "<image>a"], "no input image"),
    (["--prompt", "a dog", "--image", "{tmp}/ok.png"], "exactly one"),
    (["--prompt", "a", "--hw", "100,64"], "multiples of"),
    (["--prompt", "a <|foo|>"], "unknown special token"),
    (["--prompt", "a", "--cfg", "1", "--cfg-img", "2"], "needs text CFG"),
    (["--prompts-file", "{tmp}/bad.jsonl"], "not valid JSON"),
    (["--prompts-file", "{tmp}/nothing.jsonl"], "does not exist"),
    (["--prompt", "a", "--model", "{tmp}"], "no config.json"),
    (["--prompt", "a", "--config.sampling.steps=3"], "sampling.steps: no such field"),
    (["--prompt", "a", "--config.sampling.method=dpm"], "sampling.method='dpm'"),
    (["--prompt", "a", "--steps", "0"], "sampling.num_steps must be >= 1"),
])
def test_bad_input_exits_nonzero_and_writes_nothing(tmp_path, base_args, capsys, extra, message):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    out = tmp_path / "out"
    assert _run(base_args, out, *[e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_damaged_input_images_are_one_line_errors(tmp_path, base_args, capsys):
    import image_makers

    for name, data in image_makers.damaged_near_start().items():
        (tmp_path / name).write_bytes(data)
        assert _run(base_args, tmp_path / "out", "--prompt", "<image>a", "--image", str(tmp_path / name)) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: cannot decode input image") and name in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_output_folder_and_vae_checked_before_loading(tmp_path, golden_dir, base_args, capsys, monkeypatch):
    import nextstep_jax.sample as sample_cli

    monkeypatch.setattr(sample_cli, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "x", tmp_path / "file"):
        assert _run(base_args, out, "--prompt", "a") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: output folder") and f"{tmp_path / 'file'} is not a folder" in err, err
    assert _run(_without_vae(base_args), tmp_path / "out", "--prompt", "a") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{golden_dir / 'model'} has no vae/ folder: pass --vae" in err, err
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "out").exists()


def test_settings_precedence(tmp_path, golden_dir, base_args, side, capsys):
    """--config FILE < the model's sampling.json < --config.* < flags, probed through the output size check,
    which fails before any weights are read: each level sets a different size that is no multiple of the
    down factor."""
    down = side // 2
    file_hw, stored_hw, override_hw, flag_hw = ((down * k + 1, down) for k in (7, 6, 5, 4))
    model = tmp_path / "model"
    shutil.copytree(golden_dir / "model", model)
    (tmp_path / "c.py").write_text("from nextstep_jax.configs import default_config\n\ndef get_config():\n"
                                   f"    c = default_config()\n    c.sampling.hw = {file_hw}\n    return c\n")
    i = base_args.index("--hw")
    args = [*base_args[:i], *base_args[i + 2:], "--model", str(model), "--prompt", "a"]
    with_file = ["--config", str(tmp_path / "c.py")]
    override = f"--config.sampling.hw=({override_hw[0]},{override_hw[1]})"
    cases = [(with_file, file_hw), (with_file, stored_hw), ([*with_file, override], override_hw),
             ([*with_file, override, "--hw", f"{flag_hw[0]},{flag_hw[1]}"], flag_hw)]
    for k, (extra, (h, w)) in enumerate(cases):
        if k == 1:
            (model / "sampling.json").write_text(json.dumps({"hw": list(stored_hw)}))
        assert _run(args, tmp_path / "out", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and f"image size {h}x{w} must be" in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_unparsable_flag_is_a_usage_error(base_args, tmp_path):
    with pytest.raises(SystemExit) as e:
        _run(base_args, tmp_path, "--prompt", "a", "--hw", "big")
    assert e.value.code == 2
