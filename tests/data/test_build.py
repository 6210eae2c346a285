import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.data import build
from nextstep_jax.data.samples import EncodedImage
from nextstep_jax.data.sources import RecordSource


def _run(argv, capsys) -> dict:
    assert build.main([*map(str, argv), "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def folder(tmp_path, images):
    root = tmp_path / "imgs"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = np.concatenate([images.gradient(20, 30), np.full((20, 30, 1), 128, np.uint8)], -1)
    files = {
        "good1.jpg": images.jpeg(), "good2.png": images.png(rgba), "rotated.png": images.png(images.gradient(4, 6), exif=exif),
        "truncated.jpg": images.truncated_jpeg(), "empty.jpg": b"", "bomb.png": images.bomb_png(40000, 40000),
        "deep.png": images.png16(),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    lines = [json.dumps({"file": f, "caption": f"caption of {f}"}) for f in files]
    lines += [json.dumps({"file": "good1.jpg"}), json.dumps({"file": "nope.jpg", "caption": "x"}),
              "{not json", json.dumps({"file": "../outside.jpg", "caption": "x"})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root, files


def test_image_folder_build(folder, tmp_path, capsys):
    root, files = folder
    summary = _run(["--images", root, "--captions", tmp_path / "captions.jsonl", "--out", tmp_path / "out"], capsys)
    assert summary == {"written": 3, "skipped": 8, "skipped_by_reason": {
        "bad_record": 1, "bad_structure": 1, "decode_error": 1, "decompression_bomb": 1, "empty_file": 1,
        "missing_caption": 1, "missing_file": 1, "unsupported_mode": 1}}
    source = RecordSource(tmp_path / "out")
    got = [source[i] for i in range(len(source))]
    assert [s.key for s in got] == ["good1.jpg", "good2.png", "rotated.png"]
    for s in got:
        caption, image = s.segments
        assert s.kind == "t2i" and caption == f"caption of {s.key}" and image.data == files[s.key]
    assert [(s.segments[1].height, s.segments[1].width) for s in got] == [(32, 48), (20, 30), (6, 4)]


def test_build_is_deterministic_with_and_without_workers(folder, tmp_path, capsys):
    root, _ = folder
    args = ["--images", root, "--captions", tmp_path / "captions.jsonl", "--records-per-shard", "2"]
    first = _run([*args, "--out", tmp_path / "a"], capsys)
    second = _run([*args, "--out", tmp_path / "b", "--workers", "2"], capsys)
    assert first == second
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 3
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_entry_point_prints_summary_last(folder, tmp_path):
    root, _ = folder
    proc = subprocess.run([sys.executable, "-m", "nextstep_jax.data.build", "--images", str(root), "--captions",
                           str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 3
    assert "build" in proc.stderr  # the progress bar


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path, images, capsys):
    jpg, png = images.jpeg(), images.png()
    (tmp_path / "tars").mkdir()
    _tar(tmp_path / "tars" / "000.tar", {
        "k1.jpg": jpg, "k1.json": json.dumps({"caption": "first"}).encode(),
        "k2.png": png, "k2.txt": b"second",
        "k3.jpg": jpg, "k3.json": b"{}",
        "m1-0.jpg": jpg, "m1-1.png": png, "m1.json": json.dumps({"caption": "<image_0>make it red<image_1>"}).encode(),
    })
    _tar(tmp_path / "tars" / "001.tar", {"sub/k4.webp": b"", "sub/k4.txt": b"fourth"})
    summary = _run(["--tars", tmp_path / "tars", "--out", tmp_path / "t2i"], capsys)
    assert summary == {"written": 2, "skipped": 3,
                       "skipped_by_reason": {"bad_structure": 1, "empty_file": 1, "missing_caption": 1}}
    source = RecordSource(tmp_path / "t2i")
    assert [(source[i].key, source[i].segments[0]) for i in range(2)] == [("k1", "first"), ("k2", "second")]
    summary = _run(["--tars", tmp_path / "tars" / "000.tar", "--kind", "edit", "--out", tmp_path / "edit"], capsys)
    assert summary["written"] == 1  # k1..k3 have one image: not edits
    (edit,) = [RecordSource(tmp_path / "edit")[0]]
    assert edit.kind == "edit" and edit.key == "m1"
    assert [type(s) for s in edit.segments] == [EncodedImage, str, EncodedImage]
    assert edit.segments[0].data == jpg and edit.segments[1] == "make it red" and edit.segments[2].data == png


def test_editing_triplets_and_text(folder, tmp_path, capsys):
    root, files = folder
    edits = [{"input_image": "good1.jpg", "instruction": "make it blue", "output_image": "good2.png", "unique_id": "e1"},
             {"input_image": "good1.jpg", "instruction": "", "output_image": "good2.png"},
             {"input_image": "good1.jpg", "instruction": "x", "output_image": "bomb.png"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(map(json.dumps, edits)))
    summary = _run(["--edits", tmp_path / "edits.jsonl", "--images", root, "--out", tmp_path / "e"], capsys)
    assert summary == {"written": 1, "skipped": 2,
                       "skipped_by_reason": {"decompression_bomb": 1, "missing_caption": 1}}
    edit = RecordSource(tmp_path / "e")[0]
    assert edit.key == "e1" and edit.kind == "edit"
    assert (edit.segments[0].data, edit.segments[1], edit.segments[2].data) == (
        files["good1.jpg"], "make it blue", files["good2.png"])

    (tmp_path / "text.jsonl").write_text('{"text": "one"}\n{"text": "  "}\n[1]\n{"text": "two"}\n')
    summary = _run(["--text", tmp_path / "text.jsonl", "--out", tmp_path / "t"], capsys)
    assert summary == {"written": 2, "skipped": 2, "skipped_by_reason": {"bad_record": 1, "empty_text": 1}}
    source = RecordSource(tmp_path / "t")
    assert [source[i].segments for i in range(2)] == [("one",), ("two",)]


def test_exactly_one_input_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build.main(["--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        build.main(["--text", "a", "--edits", "b", "--out", str(tmp_path / "x")])


def test_bad_input_is_one_line_exit_2_and_writes_nothing(folder, tmp_path, capsys):
    root, _ = folder
    missing = tmp_path / "no_captions.jsonl"
    assert build.main(["--images", str(root), "--captions", str(missing), "--out", str(tmp_path / "o"),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(missing) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert build.main(["--text", str(missing), "--out", str(tmp_path / "full"), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_images_damaged_near_their_start_are_skipped(tmp_path, images, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    damaged = images.damaged_near_start()
    files = {"good.png": images.png(), **damaged}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": "c"}) + "\n" for f in files))
    summary = _run(["--images", root, "--captions", tmp_path / "captions.jsonl", "--out", tmp_path / "out"], capsys)
    assert summary == {"written": 1, "skipped": len(damaged), "skipped_by_reason": {"decode_error": len(damaged)}}


def test_an_input_with_no_usable_sample_is_an_error(folder, tmp_path, capsys):
    root, _ = folder
    captions = tmp_path / "captions.jsonl"
    for argv, culprit in ((["--images", str(tmp_path / "imgz"), "--captions", str(captions)], str(tmp_path / "imgz")),
                          (["--images", str(tmp_path), "--captions", str(captions)], str(captions))):
        assert build.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error:") and culprit in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
