"""Will it fit? Compile the train step for a TPU topology (or fake CPU devices) and report memory and speed.

    python -m nextstep_jax.plan --config=configs/14b.py --topology v5p:4x4x4 [--config.a.b=v] [--out plan.json]
    python -m nextstep_jax.plan --config=configs/tiny.py --devices 8          # no TPU runtime needed

Nothing is allocated: the train state, the batch (``config.data``: GLOBAL batch_size x seq_len) and the VAE
params are abstract ``jax.ShapeDtypeStruct``s carrying their shardings on ``config.mesh``, and the jitted step
is lowered and compiled ahead of time. A TPU topology needs the TPU runtime (``requirements-tpu.txt``; ``make
test-tpu`` creates ``.venv-tpu`` with it), which compiles for TPUs on any host. Reported per device: argument,
output, temporary and total bytes against the chip's memory; FLOPs per step from XLA's cost analysis (it counts
a loop body once: the scanned layers, microbatches and loss chunks) and the analytic count
(``training/flops.py``); projected step time, tokens/s per chip and MFU at the chip's peak. The projection
scales XLA's own time estimate for the compiled program (the TPU compiler reports one) by the analytic /
XLA FLOP ratio, which puts back the loop iterations XLA counts once; without an estimate it assumes the
chip's peak. ``--program loss`` compiles the loss forward alone.

The memory levers are config fields and the report names each one it compiled with: the attention kernel
(``model.attention_impl``, resolved for the target: splash on TPU), ``model.remat_policy`` (host-offload policies
report what they move to pinned host memory as ``host_temporary_bytes``), the AdamW moment dtypes
(``optim.mu_dtype``, ``optim.nu_dtype``), ``train_step.microbatches`` and the mesh (``mesh.sequence`` splits the
sequence).

The generation program (``generation/generator.py``: prefill, the loop over image tokens, VAE decode) is
compiled the same way, from abstract params in the decode layout and in the model's compute dtype (as
``sample.py`` loads them), for ``--num-images`` images at ``config.sampling.hw`` with the sampling settings'
guidance and a prompt of ``--prompt-tokens`` tokens; the report's ``generation`` entry gives its per-device
memory and whether it fits (image generation only: no text decoding or edit inputs).

Exit status: 0 when both programs fit, 1 when one does not (the reason and the largest buffers are printed;
a train state that alone exceeds the chip is refused before compiling), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from nextstep_jax.training.chips import CHIPS

PROGRAMS = ("train", "loss")
GIB = 2**30


class PlanError(ValueError):
    """Bad input: the message names the flag or config field."""


def _parser() -> argparse.ArgumentParser:
    from nextstep_jax.configs import add_config_arguments

    parser = argparse.ArgumentParser(prog="python -m nextstep_jax.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU topology to compile for, e.g. v5p:4x4x4, v5e:16x16, v6e:16x16")
    where.add_argument("--devices", type=int, help="compile for this many fake CPU devices instead")
    parser.add_argument("--chip", choices=sorted(CHIPS),
                        help="with --devices: compare memory and speed against this chip (default: none)")
    parser.add_argument("--program", choices=PROGRAMS, default="train",
                        help="train: the whole step (loss, gradients, update); loss: the loss forward alone")
    parser.add_argument("--num-images", type=int, default=1,
                        help="generation: images per call (rows = images x the guidance's row groups)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="generation: prompt length in tokens")
    parser.add_argument("--out", type=Path, help="also write the report as one JSON object to this file")
    return parser


def _defaults():
    """The trainer's built-in defaults: the step, optimizer and data sections are the ones a run reads."""
    from nextstep_jax.training.run_config import train_config

    return train_config()


def _devices(args):
    import jax

    if args.devices is not None:
        if args.devices < 1:
            raise PlanError(f"--devices {args.devices}: must be >= 1")
        if jax.device_count() != args.devices:
            raise PlanError(f"--devices {args.devices}: jax already started with {jax.device_count()} devices")
        return jax.devices(), CHIPS.get(args.chip), args.chip
    chip = args.topology.split(":")[0]
    if chip not in CHIPS:
        raise PlanError(f"--topology {args.topology}: unknown chip {chip!r}; known: {', '.join(sorted(CHIPS))}")
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    except Exception as e:  # noqa: BLE001 - no TPU runtime, or a topology it does not know
        raise PlanError(f"--topology {args.topology}: cannot describe it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); the TPU runtime comes with "
                        "requirements-tpu.txt (`make test-tpu` builds .venv-tpu)") from None
    return topology.devices, CHIPS[chip], chip


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree) -> int:
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _batch(config, mesh):
    import jax
    import numpy as np

    from nextstep_jax.data.pipeline import DataConfig, batch_spec
    from nextstep_jax.training.step import batch_shardings

    spec = batch_spec(DataConfig.from_config(config, process_index=0, process_count=1))
    shapes = {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
    return _abstract(shapes, batch_shardings(shapes, mesh))


def _vae_params(config, mesh, image_size: int):
    import jax
    import jax.numpy as jnp

    from nextstep_jax.models.vae import AutoencoderKL
    from nextstep_jax.sharding import shardings_of

    boxed = jax.eval_shape(lambda: AutoencoderKL(config.vae).init(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3))))
    from flax import linen as nn

    return _abstract(nn.unbox(boxed)["params"], shardings_of(boxed, mesh)["params"])


def _largest_buffers(message: str, limit: int = 8) -> list[str]:
    """The allocation lines of an XLA out-of-memory message (the compiler lists the largest first)."""
    lines = [ln.strip() for ln in message.splitlines()]
    picked = [ln for ln in lines if re.match(r"^\d+\.\s", ln) or "Size:" in ln or "Shape:" in ln]
    return picked[: 3 * limit]


def _optimizer(config):
    """The trainer's AdamW (``config.optim``, ``config.schedule``): its state, with frozen parameters left
    out and the first moment's dtype, is what memory sees."""
    from nextstep_jax.training.nextstep_task import optimizer_for

    return optimizer_for(config)[0]


def _inputs(config, mesh, program: str, optimizer):
    """Abstract (state or params, batch, VAE params or None), each leaf with its sharding."""
    from flax import linen as nn

    from nextstep_jax.models.nextstep import abstract_variables
    from nextstep_jax.sharding import shardings_of
    from nextstep_jax.training.state import abstract_train_state

    batch = _batch(config, mesh)
    vae_params = _vae_params(config, mesh, config.data.image_size) if "images" in batch else None
    if program == "train":
        state = abstract_train_state(config.model, optimizer, mesh)
    else:
        boxed = abstract_variables(config.model)
        state = _abstract(nn.unbox(boxed)["params"], shardings_of(boxed, mesh)["params"])
    return state, batch, vae_params


def _lower(config, mesh, program: str, optimizer, state, batch, vae_params):
    import jax

    from nextstep_jax.models.nextstep import NextStep
    from nextstep_jax.models.vae import AutoencoderKL
    from nextstep_jax.sharding import use_mesh
    from nextstep_jax.training.step import image_tokens_from_pixels, make_train_step

    model = NextStep(config.model)
    vae = AutoencoderKL(config.vae) if vae_params is not None else None
    if program == "train":
        return make_train_step(config, model, optimizer, mesh, vae=vae).lower(state, batch, vae_params)

    def loss(p, b, vp):
        tokens = b.get("image_tokens")
        if vae is not None:
            keys = jax.random.split(jax.random.PRNGKey(0), b["input_ids"].shape[0])
            tokens = image_tokens_from_pixels(vae, vp, b["images"], b["image_slots"], keys,
                                              config.model.latent_patch_size)
        return model.apply({"params": p}, b["input_ids"], b["labels"], tokens, b["image_loss_mask"],
                           segment_ids=b["segment_ids"], positions=b["positions"], rng=jax.random.PRNGKey(0),
                           method=NextStep.loss)[0]

    with use_mesh(mesh):
        return jax.jit(loss).lower(state, batch, vae_params)


def _cast(tree, dtype: str):
    """Float leaves in ``dtype``, as ``checkpoint.load_model(dtype=...)`` gives them to the generator."""
    import jax
    import jax.numpy as jnp

    def one(x):
        kind = jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, kind, sharding=x.sharding)

    return jax.tree.map(one, tree)


def generation_inputs(config, mesh, settings, num_images: int, prompt_tokens: int):
    """(program, plan, variables, vae variables, batch) of the generation program, the arrays abstract with
    their shardings on ``mesh``: params in the decode layout (logical shardings), prompt rows split over the
    batch axes when they divide, everything else replicated."""
    import jax
    import numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from nextstep_jax.configs import replace
    from nextstep_jax.generation.generator import GenerationProgram
    from nextstep_jax.generation.prompts import PromptRows, token_grid
    from nextstep_jax.models.layouts import for_decoding
    from nextstep_jax.models.nextstep import abstract_variables
    from nextstep_jax.models.vae import downsample_factor
    from nextstep_jax.sharding import batch_sharding, shardings_of

    # Starting from unrolled layers, the conversion keeps its inputs, so it traces under eval_shape.
    unrolled = replace(config.model, scan_layers=False)
    decode = {}

    def convert(params):
        decode["cfg"], converted = for_decoding(unrolled, params)
        return converted

    shapes = jax.eval_shape(convert, nn.unbox(abstract_variables(unrolled))["params"])
    boxed = abstract_variables(decode["cfg"])
    params = _cast(_abstract(shapes, shardings_of(boxed, mesh)["params"]), config.model.dtype)
    vae_params = _cast(_vae_params(config, mesh, config.data.image_size), config.model.dtype)
    program = GenerationProgram(replace(decode["cfg"], dtype=config.model.dtype),
                                replace(config.vae, dtype=config.model.dtype))

    settings = settings.for_model(program.model.cfg)
    rows = settings.cfg_mult * num_images
    ids = np.zeros((rows, prompt_tokens), np.int32)
    prompt = PromptRows(input_ids=ids, attention_mask=np.ones_like(ids), cfg_mult=settings.cfg_mult,
                        num_samples=num_images, images_per_caption=num_images, prefix=(),
                        grid=token_grid(settings.hw, downsample_factor(config.vae) * config.model.latent_patch_size,
                                        "sampling.hw"))
    plan, batch = program.inputs(prompt, settings)
    replicated, split = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)

    def abstract(name, value):
        x = np.asarray(value)
        sharding = replicated
        if name in ("input_ids", "attention_mask"):
            try:
                split.shard_shape(x.shape)
                sharding = split
            except ValueError:  # rows the batch axes do not divide
                pass
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    batch = {k: None if v is None else abstract(k, v) for k, v in batch.items()}
    return program, plan, {"params": params}, {"params": vae_params}, batch


def _record_fit(entry: dict, compiled, start: float, chip, chip_name: str) -> None:
    """Compile time, per-device memory and whether it fits the chip, into ``entry``."""
    entry["compile_seconds"] = round(time.perf_counter() - start, 1)
    entry["per_device_bytes"] = per_device = _memory(compiled)
    # What remat host offload moves to the host's pinned memory (not counted in the chip's total).
    entry["host_temporary_bytes"] = int(compiled.memory_analysis().host_temp_size_in_bytes)
    entry["fits"] = chip is None or per_device["total"] <= chip["memory_bytes"]
    if not entry["fits"]:
        entry["reason"] = (f"needs {per_device['total'] / GIB:.2f} GiB per chip > {chip['memory_bytes'] / GIB:.2f} "
                           f"GiB of {chip_name} memory")


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    per_device = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                  "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
                  "code": int(mem.generated_code_size_in_bytes)}
    per_device["total"] = (per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
                           + per_device["temporaries"] + per_device["code"])
    return per_device


def _out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


def plan_generation(config, mesh, chip: dict | None, chip_name: str | None, num_images: int,
                    prompt_tokens: int) -> dict:
    """The ``generation`` entry of the report (see the module docstring)."""
    from nextstep_jax.generation.prompts import PromptError
    from nextstep_jax.generation.settings import SamplingSettings, SettingsError
    from nextstep_jax.sharding import use_mesh

    try:
        settings = SamplingSettings.from_config(config.sampling)
        program, program_plan, variables, vae_variables, batch = generation_inputs(
            config, mesh, settings, num_images, prompt_tokens)
    except (SettingsError, PromptError) as e:
        raise PlanError(str(e)) from None
    entry = {"num_images": num_images, "hw": list(settings.hw), "rows": int(batch["input_ids"].shape[0]),
             "prompt_tokens": prompt_tokens, "image_tokens": program_plan.grid[0] * program_plan.grid[1],
             "dtype": config.model.dtype,
             "input_bytes": {"params": _per_device_bytes(variables), "vae_params": _per_device_bytes(vae_variables),
                             "batch": _per_device_bytes(batch)},
             "per_device_bytes": None}
    if chip and entry["input_bytes"]["params"] > chip["memory_bytes"]:
        entry.update(fits=False, reason=(
            f"the params alone need {entry['input_bytes']['params'] / GIB:.1f} GiB per chip > "
            f"{chip['memory_bytes'] / GIB:.2f} GiB of {chip_name} memory: shard them with mesh.fsdp or mesh.tensor"))
        return entry
    start = time.perf_counter()
    try:
        with use_mesh(mesh):
            compiled = program.lower(program_plan, variables, vae_variables, batch).compile()
    except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory as a generic runtime error
        if not _out_of_memory(e):
            raise
        entry.update(fits=False, reason=str(e).splitlines()[0], largest_buffers=_largest_buffers(str(e)))
        return entry
    _record_fit(entry, compiled, start, chip, chip_name)
    return entry


def plan(config, devices, chip: dict | None, chip_name: str | None, program: str = "train", *,
         num_images: int = 1, prompt_tokens: int = 128) -> dict:
    """The report (see the module docstring); ``fits`` False with ``reason`` when it does not fit. The
    ``generation`` entry is None when the train state alone was refused."""
    from nextstep_jax.configs import replace
    from nextstep_jax.models.attention import select_kernel
    from nextstep_jax.sharding import make_mesh, validate_mesh
    from nextstep_jax.training.flops import train_step_flops

    if num_images < 1:
        raise PlanError(f"--num-images {num_images}: must be >= 1")
    if prompt_tokens < 1:
        raise PlanError(f"--prompt-tokens {prompt_tokens}: must be >= 1")
    if program == "loss":
        config = replace(config, train_step=replace(config.train_step, microbatches=1))
    mesh = make_mesh(dict(config.mesh), devices)
    try:
        validate_mesh(config, mesh)
        optimizer = _optimizer(config) if program == "train" else None
        state, batch, vae_params = _inputs(config, mesh, program, optimizer)
        kernel = select_kernel(config.model.attention_impl, decoding=False, dtype=config.model.dtype,
                               platform=devices[0].platform)
    except ValueError as e:
        raise PlanError(str(e)) from None
    data = config.data
    microbatches = int(config.train_step.microbatches)
    held = "state" if program == "train" else "params"
    report = {
        "program": program, "chip": chip_name, "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch_size": int(data.batch_size), "seq_len": int(data.seq_len), "microbatches": microbatches,
        "image_input": data.image_input, "dtype": config.model.dtype, "remat_policy": config.model.remat_policy,
        "loss_chunk_size": int(config.model.loss_chunk_size), "attention_kernel": kernel,
        "moment_dtypes": ({"mu": config.optim.mu_dtype, "nu": config.optim.nu_dtype} if program == "train"
                          else None),
        "device_memory_bytes": chip["memory_bytes"] if chip else None,
        "input_bytes": {held: _per_device_bytes(state), "batch": _per_device_bytes(batch),
                        "vae_params": _per_device_bytes(vae_params) if vae_params else 0},
        "per_device_bytes": None, "flops_per_step": None, "projected": None, "generation": None,
    }
    if chip and report["input_bytes"][held] > chip["memory_bytes"]:
        what = "train state (params + AdamW moments)" if program == "train" else "params"
        report.update(fits=False, reason=(
            f"the {what} alone needs {report['input_bytes'][held] / GIB:.1f} GiB per chip > "
            f"{chip['memory_bytes'] / GIB:.2f} GiB of {chip_name} memory on mesh {report['mesh']}: shard it "
            f"over more devices with mesh.fsdp"))
        return report
    start = time.perf_counter()
    try:
        compiled = _lower(config, mesh, program, optimizer, state, batch, vae_params).compile()
    except ValueError as e:
        raise PlanError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory as a generic runtime error
        message = str(e)
        if not _out_of_memory(e):
            raise
        report.update(fits=False, reason=message.splitlines()[0], largest_buffers=_largest_buffers(message),
                      compile_seconds=round(time.perf_counter() - start, 1),
                      generation=plan_generation(config, mesh, chip, chip_name, num_images, prompt_tokens))
        return report
    _record_fit(report, compiled, start, chip, chip_name)

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    with_images = "image_tokens" in batch or "images" in batch
    analytic = train_step_flops(config.model, data.batch_size, data.seq_len, with_images)
    if program == "loss":
        forward = analytic["model"] / 3
        analytic = {"model": forward, "hardware": forward, "tokens": analytic["tokens"]}
    xla_flops = float(cost.get("flops", 0.0)) * len(devices)  # cost analysis is per device
    report["flops_per_step"] = {"xla": xla_flops, "analytic_model": analytic["model"],
                                "analytic_hardware": analytic["hardware"]}
    report["projected"] = _projection(cost, analytic, xla_flops, len(devices), chip)
    report["generation"] = plan_generation(config, mesh, chip, chip_name, num_images, prompt_tokens)
    return report


def _projection(cost: dict, analytic: dict, xla_flops: float, n_devices: int, chip: dict | None) -> dict | None:
    if chip is None:
        return None
    estimate = float(cost.get("optimal_seconds", 0.0) or 0.0)
    if estimate > 0 and xla_flops > 0:
        seconds = estimate * analytic["hardware"] / xla_flops
        source = "xla optimal_seconds x analytic/xla flops"
    else:
        seconds = analytic["hardware"] / (n_devices * chip["peak_flops"])
        source = "analytic at peak"
    return {"step_seconds": seconds, "source": source,
            "tokens_per_second_per_chip": analytic["tokens"] / seconds / n_devices,
            "mfu": analytic["model"] / (seconds * n_devices * chip["peak_flops"])}


def _table(report: dict) -> str:
    gib = lambda b: "-" if b is None else f"{b / GIB:.2f} GiB"
    rows = [("program", report["program"]), ("chip x devices", f"{report['chip'] or 'cpu'} x {report['devices']}"),
            ("mesh", " ".join(f"{k}={v}" for k, v in report["mesh"].items())),
            ("global batch x seq", f"{report['batch_size']} x {report['seq_len']} ({report['microbatches']} "
                                   f"microbatch{'es' if report['microbatches'] > 1 else ''})"),
            ("dtype / remat / loss chunk",
             f"{report['dtype']} / {report['remat_policy']} / {report['loss_chunk_size']}"),
            ("attention kernel", report["attention_kernel"])]
    if report["moment_dtypes"]:
        rows.append(("AdamW moments mu / nu", f"{report['moment_dtypes']['mu']} / {report['moment_dtypes']['nu']}"))
    rows += [(f"input: {k}", gib(v)) for k, v in report["input_bytes"].items()]
    per = report.get("per_device_bytes")
    if per:
        rows += [(f"per device: {k}", gib(v)) for k, v in per.items()]
        if report.get("host_temporary_bytes"):
            rows.append(("per device: host (offloaded)", gib(report["host_temporary_bytes"])))
    rows.append(("device memory", gib(report["device_memory_bytes"])))
    rows.append(("fits", str(report["fits"]) + (f" ({report['reason']})" if report.get("reason") else "")))
    flops = report.get("flops_per_step")
    if flops:
        rows += [(f"FLOPs/step {k}", f"{v:.4g}") for k, v in flops.items()]
    proj = report.get("projected")
    if proj:
        rows += [("projected step", f"{proj['step_seconds']:.3f} s ({proj['source']})"),
                 ("tokens/s/chip", f"{proj['tokens_per_second_per_chip']:.0f}"), ("MFU", f"{proj['mfu']:.1%}")]
    if report.get("compile_seconds") is not None:
        rows.append(("compile", f"{report['compile_seconds']} s"))
    gen = report.get("generation")
    if gen:
        rows.append(("generation", f"{gen['num_images']} x {gen['hw'][0]}x{gen['hw'][1]} ({gen['rows']} rows, "
                                   f"{gen['prompt_tokens']} prompt + {gen['image_tokens']} image tokens)"))
        rows += [(f"generation input: {k}", gib(v)) for k, v in gen["input_bytes"].items()]
        rows += [(f"generation per device: {k}", gib(v)) for k, v in (gen["per_device_bytes"] or {}).items()]
        rows.append(("generation fits", str(gen["fits"]) + (f" ({gen['reason']})" if gen.get("reason") else "")))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"  {b}" for b in report.get("largest_buffers", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    from nextstep_jax.configs import ConfigError, parse_args, resolve

    args, overrides = parse_args(parser, argv)
    if args.devices is not None and "jax" not in sys.modules:
        # Fake CPU devices exist only if XLA hears of them before jax starts.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        config = resolve(args, overrides, default=_defaults())
        devices, chip, chip_name = _devices(args)
        report = plan(config, devices, chip, chip_name, args.program, num_images=args.num_images,
                      prompt_tokens=args.prompt_tokens)
    except (PlanError, ConfigError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    print(_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.out)
    generation = report["generation"]
    return 0 if report["fits"] and (generation is None or generation["fits"]) else 1


if __name__ == "__main__":
    sys.exit(main())
