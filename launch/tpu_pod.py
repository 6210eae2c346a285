"""Train on a Cloud TPU pod slice (or several): ``python launch/tpu_pod.py ACTION ...`` (standard library only).

    python launch/tpu_pod.py all --name ns14b --zone us-east5-a --accelerator-type v5p-128 \\
        --config configs/14b.py --workdir /mnt/shared/runs/14b --config.total_steps=1000 --dry-run

ACTION is one of
  create  ask for the slice(s) as a queued resource and wait until it is ACTIVE
  setup   ship this repository's HEAD commit to every host, install Python, a venv and requirements-tpu.txt
  train   start ``python -m nextstep_jax.train`` on every host of every slice, in the background
          (its output goes to ~/nextstep_train.log on each host)
  logs    print the end of worker 0's log
  delete  delete the queued resource and its slices
  all     create, setup, train

Every action is one bash script: ``--dry-run`` prints it and runs nothing; without it the same text is run by
``bash``. Accelerator types are Cloud TPU's names, which count TensorCores for v4 and v5p (``v5p-128`` is 64
chips, the ``v5p:4x4x4`` topology of ``python -m nextstep_jax.plan``) and chips for v5e and v6e
(``v5litepod-256``, ``v6e-256``). Only committed code travels (``git archive HEAD``).

The training environment on each host: ``LIBTPU_INIT_ARGS`` = the flags below (collectives asynchronous and
overlapped with compute, which large FSDP steps need), ``NEXTSTEP_DISTRIBUTED=auto`` when a slice has several
hosts (``jax.distributed`` then finds its peers itself), and for ``--slices N`` > 1 the multi-slice variables
``MEGASCALE_COORDINATOR_ADDRESS`` (worker 0 of slice 0), ``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID`` and
``MEGASCALE_PORT``; with several slices the mesh becomes ``mesh.data = N`` over the slices (the slow
data-centre network then carries only the gradient reduction) and ``mesh.fsdp = -1`` inside each, unless a
``--config.mesh.*`` override is given. ``--workdir`` must be a path every host sees (a shared mount).

Exit status: 0 done (or printed), 2 bad input (one line naming the flag), else the failing command's status.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACTIONS = ("create", "setup", "train", "logs", "delete", "all")
# Accelerator family -> (TensorCores per chip in the type's number, TPU VM runtime image).
FAMILIES = {
    "v4": (2, "tpu-ubuntu2204-base"),
    "v5p": (2, "v2-alpha-tpuv5"),
    "v5litepod": (1, "v2-alpha-tpuv5-lite"),
    "v6e": (1, "v2-alpha-tpuv6e"),
}
CHIPS_PER_HOST = 4  # v5e and v6e slices of up to 8 chips are one host
# Accepted by libtpu 0.0.42.1 (tests/launch checks them where libtpu is installed).
LIBTPU_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_megacore_fusion_allow_ags=false",
)
MEGASCALE_PORT = 8080
REMOTE_REPO, REMOTE_VENV, REMOTE_LOG = "~/nextstep_jax", "~/nextstep_venv", "~/nextstep_train.log"
TARBALL = "/tmp/nextstep_jax.tar.gz"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,60}[a-z0-9])?$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class LaunchError(ValueError):
    """Bad input: the message names the flag."""


def accelerator(kind: str) -> dict:
    """Chips, hosts per slice and the runtime image of a Cloud TPU accelerator type such as ``v5p-128``."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", kind)
    if not match or match[1] not in FAMILIES:
        hint = " (v5e is named v5litepod-N)" if kind.startswith("v5e") else ""
        raise LaunchError(f"--accelerator-type {kind!r}: expected FAMILY-N with FAMILY one of "
                          f"{', '.join(FAMILIES)}{hint}")
    cores, runtime = FAMILIES[match[1]]
    number = int(match[2])
    if number < cores or number % cores:
        raise LaunchError(f"--accelerator-type {kind!r}: {match[1]} counts {cores} per chip")
    chips = number // cores
    single_host = match[1] in ("v5litepod", "v6e") and chips <= 8
    hosts = 1 if single_host or chips <= CHIPS_PER_HOST else chips // CHIPS_PER_HOST
    return {"chips": chips, "hosts": hosts, "runtime": runtime}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--name", required=True, help="queued resource name; with --slices N the slices are NAME-0..")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-128, v5litepod-256, v6e-256")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    p.add_argument("--slices", type=int, default=1, help="multi-slice: this many slices of the accelerator type")
    p.add_argument("--runtime-version", help="TPU VM image (default: the accelerator family's)")
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible; training resumes on rerun)")
    p.add_argument("--python", default="python3.11", help="interpreter the hosts' venv is built from")
    p.add_argument("--config", help="train: config file, relative to the repository root")
    p.add_argument("--workdir", help="train: the run's folder, on a mount every host sees")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="train: an extra environment variable on every host (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of running it")
    return p


def _gcloud(*words: str, project: str | None, zone: str) -> str:
    flags = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    return " ".join(["gcloud", "compute", "tpus", *words, *map(shlex.quote, flags)])


def _nodes(args) -> list[str]:
    return [args.name] if args.slices == 1 else [f"{args.name}-{i}" for i in range(args.slices)]


def create_lines(args, acc: dict) -> list[str]:
    nodes = (f"--node-id={args.name}" if args.slices == 1
             else f"--node-count={args.slices} --node-prefix={args.name}")
    extra = f" --accelerator-type={args.accelerator_type} " \
            f"--runtime-version={shlex.quote(args.runtime_version or acc['runtime'])} {nodes}"
    extra += " --spot" if args.spot else ""
    state = _gcloud("queued-resources", "describe", args.name, project=args.project, zone=args.zone)
    return [_gcloud("queued-resources", "create", args.name, project=args.project, zone=args.zone) + extra,
            f"while :; do s=$({state} --format='value(state.state)'); [ \"$s\" = ACTIVE ] && break; "
            f"case \"$s\" in FAILED|SUSPENDED) echo \"queued resource {args.name} is $s\" >&2; exit 1;; esac; "
            "sleep 60; done"]


def _ssh(node: str, worker: str, remote: str, args, prefix: str = "") -> str:
    """One ``tpu-vm ssh``; ``prefix`` is a double-quoted part the local shell expands (the coordinator)."""
    command = (f'"{prefix}"' if prefix else "") + shlex.quote(remote)
    return (_gcloud("tpu-vm", "ssh", node, project=args.project, zone=args.zone)
            + f" --worker={worker} --command={command}")


def setup_lines(args) -> list[str]:
    py = shlex.quote(args.python)
    remote = "; ".join([
        "set -e",
        f"command -v {py} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q {py} {py}-venv)",
        f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && tar -xzf ~/nextstep_jax.tar.gz -C {REMOTE_REPO}",
        f"{py} -m venv {REMOTE_VENV}",
        f"{REMOTE_VENV}/bin/pip install -q -r {REMOTE_REPO}/requirements-tpu.txt",
        f"{REMOTE_VENV}/bin/pip install -q --no-deps -e {REMOTE_REPO}",
    ])
    lines = [f"git -C {shlex.quote(str(REPO))} archive --format=tar.gz --output={TARBALL} HEAD"]
    for node in _nodes(args):
        lines.append(_gcloud("tpu-vm", "scp", TARBALL, f"{node}:nextstep_jax.tar.gz", project=args.project,
                             zone=args.zone) + " --worker=all")
        lines.append(_ssh(node, "all", remote, args))
    return lines


def train_overrides(args, overrides: list[str]) -> list[str]:
    if args.slices > 1 and not any(o.startswith("--config.mesh.") for o in overrides):
        return [f"--config.mesh.data={args.slices}", "--config.mesh.fsdp=-1", *overrides]
    return overrides


def train_lines(args, acc: dict, overrides: list[str]) -> list[str]:
    env = {"LIBTPU_INIT_ARGS": " ".join(LIBTPU_FLAGS)}
    if acc["hosts"] > 1 or args.slices > 1:
        env["NEXTSTEP_DISTRIBUTED"] = "auto"
    env.update(kv.split("=", 1) for kv in args.env)
    command = ["-m", "nextstep_jax.train", f"--config={args.config}", f"--workdir={args.workdir}",
               *train_overrides(args, overrides)]
    # The venv path stays unquoted: its ~ must expand on the host.
    run = (f"cd {REMOTE_REPO} && setsid nohup {REMOTE_VENV}/bin/python {' '.join(map(shlex.quote, command))} "
           f"> {REMOTE_LOG} 2>&1 < /dev/null &")
    if args.slices == 1:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        return [_ssh(args.name, "all", f"export {exports}; {run}", args)]
    describe = _gcloud("tpu-vm", "describe", f"{args.name}-0", project=args.project, zone=args.zone)
    lines = [f"COORDINATOR=$({describe} --format='value(networkEndpoints[0].ipAddress)')", "pids=()"]
    for i, node in enumerate(_nodes(args)):
        slice_env = env | {"MEGASCALE_NUM_SLICES": str(args.slices), "MEGASCALE_SLICE_ID": str(i),
                           "MEGASCALE_PORT": str(MEGASCALE_PORT)}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in slice_env.items())
        lines.append(_ssh(node, "all", f" {exports}; {run}", args,
                          prefix=f"export MEGASCALE_COORDINATOR_ADDRESS=$COORDINATOR:{MEGASCALE_PORT}")
                     + " & pids+=($!)")
    lines.append('for pid in "${pids[@]}"; do wait "$pid"; done  # the first failed ssh fails the script')
    return lines


def logs_lines(args) -> list[str]:
    return [_ssh(_nodes(args)[0], "0", f"tail -n 100 {REMOTE_LOG}", args)]


def delete_lines(args) -> list[str]:
    return [_gcloud("queued-resources", "delete", args.name, project=args.project, zone=args.zone)
            + " --force --quiet"]


def _check(args, overrides: list[str]) -> None:
    if not NAME_RE.match(args.name):
        raise LaunchError(f"--name {args.name!r}: lowercase letters, digits and '-', starting with a letter")
    if args.slices < 1:
        raise LaunchError(f"--slices {args.slices}: must be >= 1")
    if args.action not in ("train", "all"):
        if args.config or args.workdir or overrides or args.env:
            raise LaunchError(f"{args.action}: --config, --workdir, --env and --config.* belong to train/all")
        return
    for flag in ("config", "workdir"):
        if not getattr(args, flag):
            raise LaunchError(f"{args.action}: --{flag} is required")
    if not (REPO / args.config).is_file():
        raise LaunchError(f"--config {args.config}: no such file in the repository ({REPO})")
    for kv in args.env:
        if not ENV_RE.match(kv):
            raise LaunchError(f"--env {kv!r}: expected KEY=VALUE")


def script(args, overrides: list[str]) -> str:
    acc = accelerator(args.accelerator_type)
    _check(args, overrides)
    steps = {"create": lambda: create_lines(args, acc), "setup": lambda: setup_lines(args),
             "train": lambda: train_lines(args, acc, overrides), "logs": lambda: logs_lines(args),
             "delete": lambda: delete_lines(args)}
    order = ("create", "setup", "train") if args.action == "all" else (args.action,)
    head = [f"# nextstep_jax {args.action}: {args.slices} x {args.accelerator_type} ({acc['chips']} chips, "
            f"{acc['hosts']} host{'s' if acc['hosts'] > 1 else ''} per slice)", "set -euo pipefail"]
    return "\n".join(head + [line for step in order for line in steps[step]()]) + "\n"


def main(argv=None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        unknown = [a for a in rest if not a.startswith("--config.")]
        if unknown:
            raise LaunchError(f"unknown argument {unknown[0]!r} (only --config.a.b=v overrides pass through)")
        text = script(args, rest)
    except LaunchError as e:
        print(f"tpu_pod: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text, end="")
        return 0
    return subprocess.run(["bash", "-c", text]).returncode


if __name__ == "__main__":
    sys.exit(main())
