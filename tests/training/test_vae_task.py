"""VAE training: noise regularisation off equals plain VAE training, a few steps on the shapes data reduce the
held-out reconstruction error, checkpoint + resume equals an uninterrupted run, export -> release layout ->
load gives the same reconstructions, the measured latent scaling of an unnormalised VAE.

The VAE architecture is the golden tokenizer's (its config.json), the image size half its case's; the recipe
fields come from configs/tokenizer_shapes.py."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import repo_config
from nextstep_jax.checkpoint import load_vae, read_vae_config
from nextstep_jax.configs import replace
from nextstep_jax.data.image_pipeline import ImageDataConfig, make_image_iterator
from nextstep_jax.data.pipeline import dataset_specs
from nextstep_jax.models.vae import AutoencoderKL, normalize_mean, sample_posterior
from nextstep_jax.sharding import make_mesh
from nextstep_jax.training import vae_losses
from nextstep_jax.training.checkpointing import TrainCheckpointer
from nextstep_jax.training.image_metrics import psnr
from nextstep_jax.training.metrics import read_metrics
from nextstep_jax.training.optimizer import make_optimizer
from nextstep_jax.training.vae_task import (VaeEvaluator, VaeStateLayout, abstract_vae_variables, check_vae_config,
                                            export_vae, exported_vae_config, latent_statistics,
                                            make_vae_train_step, training_reconstruction, with_vae_defaults)
from train_runs import environment

BATCH = 2
CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def config(golden_dir, load_case):
    cfg = repo_config("tokenizer_shapes")
    golden = read_vae_config(golden_dir / "vae")
    cfg.vae = replace(golden, dtype="float32")
    cfg.data.image_size = int(load_case("h_vae")["img0_x"].shape[2]) // 2  # half the golden case's: CI stays short
    cfg.data.batch_size = BATCH
    cfg.total_steps = 6
    cfg.schedule.warmup_steps = 1
    cfg.vae_train.kl = 1e-4  # the golden posterior is stochastic: the KL term takes part
    cfg.eval.num_images, cfg.eval.batch_size, cfg.eval.grid_images = 8, 4, 4
    return cfg


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    """Layout, compiled step and evaluator, shared by the tests (one compilation each)."""
    mesh = make_mesh({"data": 1, "fsdp": -1})
    params = nn.unbox(abstract_vae_variables(config.vae, config.data.image_size))["params"]
    optimizer, _ = make_optimizer(config.optim, config.schedule, params, total_steps=config.total_steps)
    layout = VaeStateLayout(config, optimizer, mesh)
    evaluator = VaeEvaluator(config, mesh, tmp_path_factory.mktemp("eval"))
    return layout, make_vae_train_step(config, layout, donate=False), evaluator


def _data(config):
    return make_image_iterator(ImageDataConfig.from_config(config, process_index=0, process_count=1),
                               dataset_specs(config))


def _train(layout, step_fn, state, data, steps):
    for _ in range(steps):
        state, metrics = step_fn(state, {"images": jnp.asarray(next(data)["images"])})
    return state, metrics


def test_noise_off_equals_plain_vae_training(config):
    cfg = replace(config.vae, deterministic=True)
    vae = AutoencoderKL(cfg)
    size = config.data.image_size
    params = nn.unbox(vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32))
    keys = jax.random.split(jax.random.PRNGKey(1), BATCH)

    def ours(p, gamma):
        return vae_losses.reconstruction_terms(training_reconstruction(vae, p, x, keys, gamma)[0], x)["l1"]

    plain = lambda p: jnp.mean(jnp.abs(vae.apply({"params": p}, x) - x))  # AutoencoderKL.__call__: mean -> decode
    both = jax.jit(lambda p: (jax.value_and_grad(ours)(p, 0.0), jax.value_and_grad(plain)(p), ours(p, 0.5)))
    (a, ga), (b, gb), noisy = both(params)
    assert float(a) == float(b)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert float(noisy) != float(a)  # the regularisation does act when on


def test_stochastic_posterior_and_noise_follow_their_definition(config):
    vae = AutoencoderKL(config.vae)  # the golden posterior is stochastic
    size = config.data.image_size
    params = nn.unbox(vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32))
    keys = jax.random.split(jax.random.PRNGKey(2), BATCH)
    got, mean, logvar = jax.jit(lambda p: training_reconstruction(vae, p, x, keys, 0.3))(params)
    # The same draws by hand: posterior eps from fold_in(key, 0), noise (alpha, eps') from fold_in(key, 1).
    z = normalize_mean(mean, config.vae)
    eps = jnp.stack([jax.random.normal(jax.random.fold_in(k, 0), z.shape[1:]) for k in keys])
    z = sample_posterior(z, logvar, config.vae, eps=eps)
    alpha, noise = vae_losses.draw_latent_noise(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), z.shape[1:], 0.3)
    want = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(
        params, z + alpha[:, None, None, None] * noise)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_few_steps_reduce_held_out_error(config, run):
    layout, step_fn, evaluator = run
    state = layout.new_state(layout.scratch_params(jax.random.PRNGKey(0)), config.seed)
    before = np.mean(psnr(evaluator.images, evaluator.reconstruct(state.params)[0]))
    state, metrics = _train(layout, step_fn, state, _data(config), config.total_steps)
    after = np.mean(psnr(evaluator.images, evaluator.reconstruct(state.params)[0]))
    assert after > before + 1.5, (before, after)  # held-out MSE down by more than 1.4x
    assert int(state.step) == config.total_steps and float(metrics["nonfinite"]) == 0.0
    assert set(metrics) >= {"loss", "l1", "l2", "kl", "grad_norm"}


def test_resume_equals_an_uninterrupted_run(config, run, tmp_path):
    layout, step_fn, _ = run
    params = layout.scratch_params(jax.random.PRNGKey(0))
    straight, _ = _train(layout, step_fn, layout.new_state(params, config.seed), _data(config), 4)
    data = _data(config)
    half, _ = _train(layout, step_fn, layout.new_state(params, config.seed), data, 2)
    ckpt = TrainCheckpointer(tmp_path, every_steps=2, keep=1)
    ckpt.save(2, half, data)
    ckpt.close()
    fresh = _data(config)
    step, restored = TrainCheckpointer(tmp_path, every_steps=2, keep=1).restore_latest(layout.abstract, fresh)
    assert step == 2
    resumed, _ = _train(layout, step_fn, restored, fresh, 2)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_load_gives_the_same_reconstructions(config, run, tmp_path):
    layout, _, evaluator = run
    params = layout.scratch_params(jax.random.PRNGKey(3))
    export_vae(config.vae, params, tmp_path / "vae")
    cfg, loaded = load_vae(tmp_path / "vae")
    assert {k: cfg[k] for k in cfg if k != "dtype"} == {k: config.vae[k] for k in config.vae if k != "dtype"}
    for a, b in zip(evaluator.reconstruct(params), evaluator.reconstruct(loaded)):
        np.testing.assert_array_equal(a, b)


def test_measured_scaling_only_without_normalisation(config):
    rng = np.random.default_rng(4)
    z = rng.normal(0.7, 2.5, (6, 4, 4, config.vae.z_channels))
    stats = latent_statistics(z)
    np.testing.assert_allclose(stats["channel_mean"], z.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(stats["channel_std"], z.std(axis=(0, 1, 2)))
    assert exported_vae_config(config.vae, stats) is config.vae  # encoder_norm: scale 1 / shift 0 convention kept
    plain = exported_vae_config(replace(config.vae, encoder_norm=False), stats)
    assert plain.shift_factor == pytest.approx(z.mean()) and plain.scaling_factor == pytest.approx(1 / z.std())
    np.testing.assert_allclose(np.std((z - plain.shift_factor) * plain.scaling_factor), 1.0)


def _cli(golden_dir, workdir, *extra):
    from nextstep_jax import train

    return train.main(["--config", str(CONFIGS / "tokenizer_shapes.py"),
                       "--workdir", str(workdir), "--no-progress", f"--config.init.vae={golden_dir / 'vae'}",
                       "--config.total_steps=2", f"--config.data.batch_size={BATCH}", "--config.data.image_size=32",
                       "--config.eval.num_images=4", "--config.eval.batch_size=2", "--config.eval.grid_images=2",
                       *extra])


def test_trainer_fine_tunes_a_release_and_exports_it(golden_dir, tmp_path):
    assert _cli(golden_dir, tmp_path / "run", "--export", str(tmp_path / "release")) == 0
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2] and "eval/psnr_db" in lines[1] and "eval/geneval" in lines[1]
    assert (tmp_path / "run" / "eval" / "step_0000002.png").is_file()
    report = json.loads((tmp_path / "run" / "eval" / "step_0000002.json").read_text())
    assert len(report["latent"]["channel_std"]) == read_vae_config(golden_dir / "vae").z_channels
    cfg, params = load_vae(tmp_path / "release")
    golden = read_vae_config(golden_dir / "vae")
    assert {k: cfg[k] for k in cfg} == {k: golden[k] for k in golden}  # the release's settings carried over
    _, start = load_vae(golden_dir / "vae")
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start))]
    assert any(changed)  # trained from the release's weights


def test_a_frozen_encoder_keeps_the_release_encoder_bit_for_bit(golden_dir, tmp_path):
    assert _cli(golden_dir, tmp_path / "run", "--export", str(tmp_path / "release"),
                "--config.vae_train.freeze_encoder=True", "--config.vae_train.noise_gamma=0.3") == 0
    _, start = load_vae(golden_dir / "vae")
    _, params = load_vae(tmp_path / "release")
    for part in ("encoder", "decoder"):
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start[part]), jax.tree.leaves(params[part]))]
        assert all(same) if part == "encoder" else not all(same), part


def test_a_frozen_encoder_needs_a_tokenizer_to_start_from(golden_dir, tmp_path, capsys):
    assert _cli(golden_dir, tmp_path / "run", "--config.vae_train.freeze_encoder=True", "--config.init.vae=") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: vae_train.freeze_encoder=True: needs init.vae, the trained tokenizer whose encoder it keeps"]
    assert not (tmp_path / "run").exists()


def test_trainer_rejects_a_bad_field_before_building(golden_dir, tmp_path, capsys):
    assert _cli(golden_dir, tmp_path / "run", "--config.vae_train.init=bogus") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: vae_train.init='bogus': expected one of ('official', 'residual_zero')"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mesh_step_matches_one_device(golden_dir, config):
    """8 fake devices (subprocess): the sharded step, critic included, equals the single-device one."""
    env = environment(8)
    script, config_file = Path(__file__).with_name("vae_mesh_step.py"), CONFIGS / "tokenizer_shapes.py"
    out = subprocess.run([sys.executable, str(script), str(golden_dir / "vae"), str(config.data.image_size),
                          str(config_file)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    # Only the order of float32 reductions differs between the two layouts.
    assert max(diffs["metrics"].values()) < 1e-4, diffs
    assert diffs["params"] < 1e-3 and diffs["disc_params"] < 1e-3, diffs  # of the largest update


@pytest.mark.parametrize("name", ["tokenizer_shapes", "tokenizer_shapes_decoder", "tokenizer_finetune"])
def test_repository_configs_are_valid(name):
    config = with_vae_defaults(repo_config(name))
    config.init.vae = config.init.vae or "runs/vae/release"  # the decoder fine-tune names the tokenizer it starts from
    check_vae_config(config)
    assert config.task == "vae"
