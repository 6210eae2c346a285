"""Train NextStep: ``python -m nextstep_jax.train --config=configs/X.py --workdir DIR [--config.a.b=v ...]``.

    python -m nextstep_jax.train --config=configs/tiny.py --workdir runs/tiny      # a CPU, the built-in shapes
    python -m nextstep_jax.train --config=configs/14b.py --workdir /runs/14b --config.total_steps=12 \\
        --config.checkpoint.every_steps=4
    python -m nextstep_jax.train --config=configs/tiny.py --workdir runs/tiny --export runs/tiny/release

Top to bottom: resolve the config (built-in training defaults < the file < what the init checkpoint and VAE
store < ``--config.*``); join the other processes of a multi-host run; let the task ``config.task`` check the
config and build its mesh, model, optimizer, data pipeline and initial params; then train in the shared loop:
restore the newest checkpoint of the workdir or start, compile the step, train for ``config.total_steps``
steps, export when asked. Tasks: "nextstep" (``training/nextstep_task.py``) and "vae" (the image tokenizer,
``training/vae_task.py``).

The workdir holds ``config.json`` (the resolved config), ``checkpoints/`` (every ``checkpoint.every_steps``
steps, on SIGTERM and at the end), ``metrics.jsonl`` and ``tensorboard/`` (every step), ``samples/`` (a grid of
``eval.prompts`` every ``eval.every_steps`` steps; the VAE task writes ``eval/``) and ``profile/``
(``profile.num_steps`` steps from ``profile.start_step``). Re-running the same command resumes from the newest
complete checkpoint with the same data order and random numbers, so the steps after it repeat an uninterrupted
run exactly.

Run as a program, it first restarts itself once with huge pages for the heap (``nextstep_jax/host_memory.py``;
``NEXTSTEP_HUGE_PAGES=0`` turns that off).

Exit status: 0 done; 2 bad input (one line naming the file, field or value; nothing written, nothing
compiled); 1 stopped at a non-finite step under ``train_step.nonfinite="stop"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nextstep_jax import configs, host_memory
from nextstep_jax.training import distributed, loop, nextstep_task, vae_task
from nextstep_jax.training.run_config import resolve_config

TASKS = {"nextstep": nextstep_task.prepare, "vae": vae_task.prepare}  # config.task -> prepare(config, args)
USER_ERRORS = (ValueError, OSError)  # ConfigError, InitError, CheckpointError, ... are ValueErrors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configs.add_config_arguments(p, required=True)
    p.add_argument("--workdir", required=True, type=Path,
                   help="checkpoints, metrics, samples and the resolved config go here; rerunning resumes")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="after training, write the model to DIR in the official release layout (config.json, "
                        "safetensors, tokenizer, vae/); with --config.total_steps at or below the newest "
                        "checkpoint it exports that checkpoint without training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics are still written)")
    multi = p.add_argument_group("multi-host (default: NEXTSTEP_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, "
                                 "else what the cluster launcher tells JAX, else one process)")
    multi.add_argument("--coordinator", help="host:port of process 0")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    return p


def main(argv=None) -> int:
    args, overrides = configs.parse_args(parser(), argv)
    try:
        config = resolve_config(args, overrides, TASKS)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before JAX is asked for devices
        task = TASKS[config.task](config, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return loop.train(task)


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()
    sys.exit(main())
