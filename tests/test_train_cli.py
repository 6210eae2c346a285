"""``python -m nextstep_jax.train``: what a run leaves in its workdir (resolved config, checkpoints, metrics with
every per-step field, TensorBoard events, a sample grid, a profiler trace); ``--export DIR`` on the finished run
writes the official release layout (of the params' moving average, which this run keeps), which the loading code
reads back bit for bit, without training again;
bad input is refused with exit status 2, one line naming the culprit and nothing written: an unknown task, a
missing init checkpoint, an LLM or tokenizer whose vocabulary does not fit the model."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from nextstep_jax import configs, train
from nextstep_jax.training import nextstep_task
from nextstep_jax.training.run_config import resolve_config
from nextstep_jax.checkpoint import load_model, load_vae, read_model_config
from nextstep_jax.data.tokenizer import load_tokenizer
from train_runs import REPO, SMALL, checkpoint_steps, read_metrics, run_train

PER_STEP = ("step", "loss", "lm_loss", "im_loss", "grad_norm", "lr", "tokens_per_s", "images_per_s", "step_time",
            "model_tflops_per_s", "data/skipped", "skipped", "nonfinite")


ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rope_theta", "latent_channels", "latent_patch_size", "fm_head_dim", "fm_head_layers",
                "fm_head_batch_mul", "lm_loss_weight", "im_loss_weight", "noise_strength", "boi", "eoi",
                "image_placeholder_id", "pad_token_id")


def test_a_run_writes_its_workdir_and_exports(tmp_path):
    workdir = tmp_path / "run"
    args = ("--config.total_steps=2", "--config.checkpoint.every_steps=1", "--config.eval.every_steps=2",
            "--config.profile.start_step=2", "--config.profile.num_steps=1", "--config.model.noise_strength=0.25",
            "--config.optim.ema_decay=0.5")
    proc = run_train(workdir, *args)
    config = json.loads((workdir / "config.json").read_text())
    assert config["total_steps"] == 2 and config["data"]["seq_len"] == 96 and config["task"] == "nextstep"
    assert config["model"]["noise_strength"] == 0.25
    assert checkpoint_steps(workdir) == [1, 2]
    metrics = read_metrics(workdir)
    assert sorted(metrics) == [1, 2]
    for line in metrics.values():
        assert set(PER_STEP) <= set(line), sorted(set(PER_STEP) - set(line))
        assert np.isfinite(line["loss"]) and line["step_time"] > 0 and line["tokens_per_s"] > 0
    assert metrics[1]["lr"] == 0.0  # the first update of a linear warmup from 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((workdir / "profile").rglob("*.xplane.pb")), "no profiler trace"
    grid = workdir / "samples" / "step_0000002.png"
    assert grid.is_file(), proc.stderr
    prompts = len(config["eval"]["prompts"])
    with Image.open(grid) as image:
        assert image.format == "PNG" and json.loads(image.text["prompts"]) == config["eval"]["prompts"]
        assert image.width * image.height >= prompts * 64 * 64  # one sampling.hw image per prompt

    dest = tmp_path / "release"
    proc = run_train(workdir, *args, "--export", str(dest))
    assert "compiled the train step" not in proc.stderr and sorted(read_metrics(workdir)) == [1, 2]
    _check_export(dest, workdir, config, step=2)


def _check_export(dest, workdir, config, step):
    assert json.loads((dest / "config.json").read_text())["model_type"] == "nextstep"
    cfg = read_model_config(dest)
    for field in ARCHITECTURE:
        assert cfg[field] == config["model"][field], field
    # The saved train state, read without a target (independent of the trainer's restore): the run keeps a
    # moving average of its params (optim.ema_decay), and that average is what it exports.
    state = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute())
    averages = [v for v in jax.tree.leaves(state["opt_state"], is_leaf=_is_ema) if _is_ema(v)]
    assert len(averages) == 1, jax.tree.structure(state["opt_state"])
    flat_ema = _flat(averages[0]["ema"])
    flat_params, flat_loaded = _flat(state["params"]), _flat(load_model(dest)[1])
    assert flat_ema.keys() == flat_loaded.keys() == flat_params.keys()
    for path, value in flat_ema.items():
        np.testing.assert_array_equal(flat_loaded[path], value, err_msg=jax.tree_util.keystr(path))
    assert any(not np.array_equal(flat_params[p], v) for p, v in flat_ema.items())  # the average is not the params
    vae_cfg, _ = load_vae(dest / "vae")
    for key, value in config["vae"].items():
        if key != "dtype":
            assert vae_cfg[key] == (tuple(value) if isinstance(value, list) else value), key
    assert load_tokenizer(dest).special.boi == config["model"]["boi"]
    assert json.loads((dest / "sampling.json").read_text())["hw"] == config["sampling"]["hw"]


def _is_ema(node) -> bool:
    return isinstance(node, dict) and set(node) == {"count", "ema"}


def _flat(tree) -> dict:
    return dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, tree))[0])


def _refused(tmp_path, capsys, *overrides, config="configs/tiny.py"):
    workdir = tmp_path / "run"
    code = train.main([f"--config={REPO / config}", "--workdir", str(workdir), "--no-progress", *SMALL, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert not workdir.exists()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_unknown_task_is_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--config.task=bogus")
    assert f"task='bogus': expected one of {sorted(train.TASKS)}" in line


def test_missing_init_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_release"
    line = _refused(tmp_path, capsys, "--config.init.source=checkpoint", f"--config.init.path={missing}")
    assert f"init.path='{missing}': no such folder" in line


def test_init_checkpoint_of_another_vocabulary_is_named(tmp_path, capsys, golden_dir):
    vocab = json.loads((golden_dir / "model" / "config.json").read_text())["vocab_size"]
    line = _refused(tmp_path, capsys, "--config.init.source=checkpoint", f"--config.init.path={golden_dir / 'model'}",
                    f"--config.init.vae={golden_dir / 'vae'}", f"--config.model.vocab_size={vocab + 64}")
    assert f"vocab_size: {vocab} vs {vocab + 64}" in line and str(golden_dir / "model") in line


def test_llm_of_another_vocabulary_is_named(tmp_path, capsys, golden_dir):
    llm = tmp_path / "qwen"
    llm.mkdir()
    shutil.copy(golden_dir / "model" / "model.safetensors", llm)
    (llm / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 1000}))
    line = _refused(tmp_path, capsys, "--config.init.source=qwen", f"--config.init.path={llm}")
    assert "the LLM's vocabulary has 1000 embedding rows" in line and "config.model.vocab_size" in line


def test_tokenizer_larger_than_the_vocabulary_is_named(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--config.model.vocab_size=100")
    assert "model.vocab_size=100 is smaller than tokenizer builtin:bytes" in line


def test_init_from_a_release_takes_its_architecture_tokenizer_and_vae(tmp_path, golden_dir):
    """Fine-tuning (as configs/edit.py): the run's model section, tokenizer and VAE come from the release; the
    initial params are the release's."""
    release, vae = golden_dir / "model", golden_dir / "vae"
    argv = [f"--config={REPO / 'configs' / 'tiny.py'}", "--workdir", str(tmp_path / "run"), *SMALL,
            "--config.init.source=checkpoint", f"--config.init.path={release}", f"--config.init.vae={vae}"]
    args, overrides = configs.parse_args(train.parser(), argv)
    run = nextstep_task.prepare(resolve_config(args, overrides, train.TASKS), args)
    stored = read_model_config(release)
    for field in ARCHITECTURE:
        assert run.config.model[field] == stored[field], field
    assert run.tokenizer_path == str(release)
    assert run.config.vae.scaling_factor == json.loads((vae / "config.json").read_text())["scaling_factor"]
    _, params = load_model(release)
    for got, want in zip(jax.tree.leaves(run.initial_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _, vae_params = load_vae(vae)
    for got, want in zip(jax.tree.leaves(run.vae_params), jax.tree.leaves(vae_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not (tmp_path / "run").exists()  # nothing written before training starts
