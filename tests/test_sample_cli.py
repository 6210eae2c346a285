"""`python -m nextstep_jax.sample` on the golden release folders: reproducible files with their metadata,
and bad input refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.checkpoint.convert_lib import import_release
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
    assert _run(base_args, tmp_path / "a", *args, "--seed", "5") == 0
    printed = capsys.readouterr().out.split()
    assert _run(base_args, tmp_path / "b", *args, "--seed", "5") == 0
    assert _run(base_args, tmp_path / "c", *args, "--seed", "6") == 0

    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(pngs) == 3 and any(name.endswith("_grid.png") for name in pngs)
    assert sorted(str(tmp_path / "a" / n) for n in pngs) == sorted(printed)
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


def test_edit_with_text_from_prompts_file_and_converted_checkpoints(tmp_path, golden_dir, base_args):
    """Editing, a text span decoded before the image, model and VAE as Orbax checkpoints written by
    nextstep_jax.convert (tokenizer from its release/)."""
    for kind in ("model", "vae"):
        import_release(golden_dir / kind, tmp_path / kind, progress=False)
    converted = [*base_args, "--model", str(tmp_path / "model"), "--vae", str(tmp_path / "vae")]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "<image>Add a hat.", "image": "in.png",
                                                  "name": "hat"}) + "\n")
    assert _run(converted, tmp_path / "out", "--prompts-file", str(tmp_path / "p.jsonl"), "--cfg-img", "1.5",
                "--text-tokens", "3", "--temperature", "0.7") == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert "hat" in png.name
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["image"].endswith("in.png") and isinstance(sidecar["generated_text"], str)


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
])
def test_bad_input_exits_nonzero_and_writes_nothing(tmp_path, base_args, capsys, extra, message):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    out = tmp_path / "out"
    assert _run(base_args, out, *[e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not out.exists()


def test_unparsable_flag_is_a_usage_error(base_args, tmp_path):
    with pytest.raises(SystemExit) as e:
        _run(base_args, tmp_path, "--prompt", "a", "--hw", "big")
    assert e.value.code == 2
