"""Train on a SLURM GPU cluster: ``python launch/gpu_slurm.py ...`` writes an sbatch script and submits it
(standard library only).

    python launch/gpu_slurm.py --nodes 4 --gpus-per-node 8 --venv /shared/venvs/nextstep \\
        --config configs/14b.py --workdir /shared/runs/14b --partition gpu --time 2-00:00:00 \\
        --config.total_steps=1000 --dry-run

Run it from this repository's checkout on a file system the compute nodes share; ``--venv`` is a virtual
environment there with the project installed for CUDA, e.g. ``python3 -m venv VENV && VENV/bin/pip install -r
requirements.txt "jax[cuda13]" && VENV/bin/pip install --no-deps -e .``. ``--dry-run`` prints the script and
the ``sbatch`` command and writes nothing; without it the script is written to ``--script`` and submitted.

``--per gpu`` (default) starts one process per GPU: every task sees all of its node's GPUs (``srun
--gpu-bind=none``) and ``jax.distributed`` gives each the GPU of its ``SLURM_LOCALID``. ``--per host`` starts
one process per node that drives all its GPUs (``JAX_LOCAL_DEVICE_IDS`` lists them; without it JAX would keep
only the first). In both, ``python -m nextstep_jax.train`` finds the job's processes in the SLURM environment
(``SLURM_JOB_ID``, ``SLURM_NTASKS`` > 1: ``training/distributed.py``), with process 0's node as coordinator.
The environment sets ``XLA_FLAGS`` below (the latency-hiding scheduler, which overlaps FSDP's collectives with
compute, large collective combining and pipelined collectives across the scanned layers) and lets JAX take 90%
of each GPU's memory.

Exit status: 0 done (or printed), 2 bad input (one line naming the flag), else sbatch's status.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Accepted by jaxlib 0.10.2 (tests/launch checks them against the installed jaxlib).
XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)
MEMORY_FRACTION = "0.90"
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
WORD_RE = re.compile(r"^[A-Za-z0-9_.,-]+$")


class LaunchError(ValueError):
    """Bad input: the message names the flag."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/gpu_slurm.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--per", choices=("gpu", "host"), default="gpu", help="one process per GPU or per node")
    p.add_argument("--venv", type=Path, required=True, help="virtual environment with the project installed")
    p.add_argument("--config", required=True, help="config file, relative to the repository root")
    p.add_argument("--workdir", required=True, help="the run's folder, on a file system every node sees")
    p.add_argument("--job-name", default="nextstep")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="SLURM time limit, e.g. 2-00:00:00")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per process (data loading)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra environment variable for the job (repeatable)")
    p.add_argument("--script", type=Path, help="where to write the sbatch script (default: JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    return p


def _check(args, overrides: list[str]) -> None:
    unknown = [a for a in overrides if not a.startswith("--config.")]
    if unknown:
        raise LaunchError(f"unknown argument {unknown[0]!r} (only --config.a.b=v overrides pass through)")
    for flag in ("nodes", "gpus_per_node", "cpus_per_task"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LaunchError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    if not (args.venv / "bin" / "python").exists():
        raise LaunchError(f"--venv {args.venv}: no bin/python in it")
    if not (REPO / args.config).is_file():
        raise LaunchError(f"--config {args.config}: no such file in the repository ({REPO})")
    if args.time and not TIME_RE.match(args.time):
        raise LaunchError(f"--time {args.time!r}: expected [days-]hours[:minutes[:seconds]]")
    for flag in ("job_name", "partition", "account"):
        value = getattr(args, flag)
        if value is not None and not WORD_RE.match(value):
            raise LaunchError(f"--{flag.replace('_', '-')} {value!r}: letters, digits and . , _ - only")
    for kv in args.env:
        if not ENV_RE.match(kv):
            raise LaunchError(f"--env {kv!r}: expected KEY=VALUE")


def sbatch_script(args, overrides: list[str]) -> str:
    tasks = args.gpus_per_node if args.per == "gpu" else 1
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
                  f"--gpus-per-node={args.gpus_per_node}", "--exclusive", "--output=%x-%j.out"]
    directives += [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                   for flag in ("partition", "account", "time", "cpus_per_task") if getattr(args, flag)]
    env = {"XLA_FLAGS": " ".join(XLA_FLAGS), "XLA_PYTHON_CLIENT_MEM_FRACTION": MEMORY_FRACTION}
    if args.per == "host":
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(map(str, range(args.gpus_per_node)))
    env.update(kv.split("=", 1) for kv in args.env)
    srun = ["srun", "--kill-on-bad-exit=1"] + (["--gpu-bind=none"] if args.per == "gpu" else [])
    train = [str(args.venv.resolve() / "bin" / "python"), "-m", "nextstep_jax.train", f"--config={args.config}",
             f"--workdir={args.workdir}", *overrides]
    lines = ["#!/bin/bash",
             f"# nextstep_jax: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), one process per {args.per}"]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += ["set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [f"cd {shlex.quote(str(REPO))}", " ".join(map(shlex.quote, srun + train))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        _check(args, overrides)
        text = sbatch_script(args, overrides)
    except LaunchError as e:
        print(f"gpu_slurm: {e}", file=sys.stderr)
        return 2
    path = args.script or Path(f"{args.job_name}.sbatch")
    submit = f"sbatch {shlex.quote(str(path))}"
    if args.dry_run:
        print(text, end="")
        print(f"# then: {submit}")
        return 0
    path.write_text(text)
    return subprocess.run(["sbatch", str(path)]).returncode


if __name__ == "__main__":
    sys.exit(main())
