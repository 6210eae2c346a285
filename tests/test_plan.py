"""`python -m nextstep_jax.plan` on fake CPU devices: the JSON report of a compiled tiny train step and
generation program, the refusal of a 14B state that cannot fit 8 chips without FSDP, and bad input (exit 2, the
culprit named); the generation program lowered from abstract inputs is the one real inputs lower to."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import jax
import ml_collections
import pytest

from nextstep_jax.checkpoint import load_model, load_vae
from nextstep_jax.configs import mesh_config
from nextstep_jax.generation.generator import Generator
from nextstep_jax.generation.prompts import PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.plan import generation_inputs
from nextstep_jax.training.chips import CHIPS
from nextstep_jax.sharding import make_mesh, use_mesh

REPO = Path(__file__).resolve().parents[1]


def _plan(tmp_path, config, *args):
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    run = subprocess.run([sys.executable, "-m", "nextstep_jax.plan", "--config", str(REPO / "configs" / config),
                          "--out", str(out), *args], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    return run, (json.loads(out.read_text()) if out.exists() else None)


def test_tiny_step_report(tmp_path):
    run, report = _plan(tmp_path, "tiny.py", "--devices", "8", "--chip", "v5p", "--config.mesh.data=2",
                        "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.data.batch_size=8",
                        "--config.data.seq_len=64", "--config.train_step.microbatches=2", "--num-images=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert report["fits"] is True and report["devices"] == 8 and report["microbatches"] == 2
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert report["device_memory_bytes"] == CHIPS["v5p"]["memory_bytes"]
    per = report["per_device_bytes"]
    assert per["total"] == per["arguments"] + per["outputs"] - per["aliased"] + per["temporaries"] + per["code"]
    assert per["aliased"] >= report["input_bytes"]["state"] > 0  # the donated state is updated in place
    assert report["flops_per_step"]["xla"] > 0 and report["flops_per_step"]["analytic_model"] > 0
    assert 0 < report["projected"]["mfu"] <= 1
    assert report["attention_kernel"] == "xla" and report["moment_dtypes"] == {"mu": "float32", "nu": "float32"}
    for line in ("per device: total", "FLOPs/step analytic_model", "MFU", "generation per device: total"):
        assert line in run.stdout
    gen = report["generation"]
    assert gen["fits"] is True and gen["num_images"] == 2 and gen["hw"] == [64, 64]  # configs/tiny.py sampling.hw
    assert gen["rows"] == 2 * 2  # the tiny config's text guidance doubles the rows
    per = gen["per_device_bytes"]
    assert min(per["arguments"], per["outputs"], per["temporaries"]) > 0
    assert per["total"] == per["arguments"] + per["outputs"] - per["aliased"] + per["temporaries"] + per["code"]
    assert gen["input_bytes"]["params"] > 0 and gen["input_bytes"]["vae_params"] > 0


def test_memory_levers_show_in_the_report(tmp_path):
    """bfloat16 AdamW moments shrink the state by exactly the float32 params' size (mu and nu each halve), full
    remat shrinks the step's temporaries, and the report names the levers it compiled with."""
    base = ["--devices", "8", "--chip", "v5p", "--config.mesh.fsdp=8", "--config.data.batch_size=8",
            "--config.data.seq_len=256", "--config.data.image_input=latents"]
    run, plain = _plan(tmp_path, "tiny.py", *base)
    assert run.returncode == 0, run.stderr[-3000:]
    levers = ["--config.optim.mu_dtype=bfloat16", "--config.optim.nu_dtype=bfloat16",
              "--config.model.remat_policy=full"]
    run, lean = _plan(tmp_path, "tiny.py", *base, *levers)
    assert run.returncode == 0, run.stderr[-3000:]
    assert plain["attention_kernel"] == lean["attention_kernel"] == "xla"  # CPU devices
    assert plain["moment_dtypes"] == {"mu": "float32", "nu": "float32"}
    assert lean["moment_dtypes"] == {"mu": "bfloat16", "nu": "bfloat16"} and lean["remat_policy"] == "full"
    assert re.search(r"AdamW moments mu / nu\s+bfloat16 / bfloat16", run.stdout), run.stdout
    # state = params + mu + nu (+ a few scalars): float32 3P, bfloat16 moments 2P.
    params = plain["input_bytes"]["state"] - lean["input_bytes"]["state"]
    assert 3 * params <= plain["input_bytes"]["state"] <= 3 * params + 1024, (plain["input_bytes"], lean["input_bytes"])
    assert lean["per_device_bytes"]["temporaries"] < plain["per_device_bytes"]["temporaries"]


def test_generation_lowers_from_abstract_inputs_as_from_real_ones(golden_dir):
    """The plan's abstract params (decode layout), VAE params and batch have the tree, shapes and dtypes of a
    Generator's real ones: placed on the plan's shardings, both lower to the same program."""
    generator = Generator(*load_model(golden_dir / "model"), *load_vae(golden_dir / "vae"),
                          PromptTokenizer(golden_dir / "model"))
    side = 2 * generator.prompts.down_factor
    settings = SamplingSettings.from_config(num_steps=2, guidance_scale=3.0, hw=(side, side)).for_model(
        generator.model.cfg)
    rows = generator.prompts.rows(["a red fox"], settings, num_images_per_caption=2)
    real_plan, real_batch = generator.inputs(rows, settings)

    config = ml_collections.ConfigDict(dict(model=generator.model.cfg, vae=generator.vae.cfg,
                                            data=dict(image_size=side)))
    mesh = make_mesh(dict(mesh_config()), jax.devices())
    program, plan, variables, vae_variables, batch = generation_inputs(config, mesh, settings, 2,
                                                                       rows.input_ids.shape[1])
    assert dataclasses.replace(plan, prefix=rows.prefix) == real_plan  # the prefix is read only with text decoding

    def placed(real, abstract):
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), real, abstract)

    with use_mesh(mesh):
        from_abstract = program.lower(plan, variables, vae_variables, batch).as_text()
        from_real = generator.lower(real_plan, placed(generator.variables, variables),
                                    placed(generator.vae_variables, vae_variables),
                                    placed(real_batch, batch)).as_text()
    assert from_abstract == from_real


def test_14b_without_fsdp_on_8_chips_is_refused(tmp_path):
    run, report = _plan(tmp_path, "14b.py", "--devices", "8", "--chip", "v5p", "--config.mesh.fsdp=1",
                        "--config.mesh.data=8", "--config.data.batch_size=8", "--config.train_step.microbatches=1")
    assert run.returncode == 1, run.stderr[-3000:]
    assert report["fits"] is False and report["per_device_bytes"] is None
    # 15.0B float32 params and two float32 AdamW moments, replicated on every chip.
    assert report["input_bytes"]["state"] > 3 * 4 * 14.9e9
    assert "alone needs" in report["reason"] and "mesh.fsdp" in report["reason"] and "alone needs" in run.stdout


def test_bad_input_names_the_culprit(tmp_path):
    run, report = _plan(tmp_path, "tiny.py", "--devices", "2", "--config.mesh.tensor=2", "--config.mesh.fsdp=1",
                        "--config.model.num_heads=3")
    assert run.returncode == 2 and report is None
    assert "model.num_heads=3 is not divisible by mesh axis tensor=2" in run.stderr
    run, _ = _plan(tmp_path, "tiny.py", "--devices", "2", "--config.mesh.bogus=1")
    assert run.returncode == 2 and "mesh.bogus" in run.stderr
    run, report = _plan(tmp_path, "tiny.py", "--devices", "2", "--num-images=0")
    assert run.returncode == 2 and report is None and "--num-images 0: must be >= 1" in run.stderr


@pytest.mark.skipif(find_spec("libtpu") is not None, reason="the TPU runtime is installed here")
def test_topology_without_tpu_runtime_says_what_to_install(tmp_path):
    run, _ = _plan(tmp_path, "tiny.py", "--topology", "v5p:2x2x2")
    assert run.returncode == 2 and "requirements-tpu.txt" in run.stderr
