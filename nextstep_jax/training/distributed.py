"""Multi-host start-up: ``jax.distributed.initialize`` when the job has several processes.

Where the settings come from, first match wins:
  1. explicit arguments (the CLI's ``--coordinator``, ``--num_processes``, ``--process_id``);
  2. ``NEXTSTEP_COORDINATOR`` (host:port of process 0), ``NEXTSTEP_NUM_PROCESSES``, ``NEXTSTEP_PROCESS_ID``;
  3. a launcher JAX recognises by itself: SLURM or Open MPI with more than one task, a multi-host TPU slice
     (``TPU_WORKER_HOSTNAMES`` lists several hosts, or multi-slice ``MEGASCALE_*``), or
     ``NEXTSTEP_DISTRIBUTED=auto`` to let JAX detect any other cluster (e.g. TPU VMs whose topology only the
     metadata server knows);
  4. otherwise one process, and nothing is initialised.

CPU processes exchange collectives through gloo (the CPU client has none by default).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "NEXTSTEP_COORDINATOR"
ENV_NUM_PROCESSES = "NEXTSTEP_NUM_PROCESSES"
ENV_PROCESS_ID = "NEXTSTEP_PROCESS_ID"
ENV_AUTO = "NEXTSTEP_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str  # "single" | "explicit" | "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _several(env: Mapping[str, str], name: str) -> bool:
    try:
        return int(env.get(name, "1")) > 1
    except ValueError:
        return False


def _cluster_launched(env: Mapping[str, str]) -> bool:
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return (("SLURM_JOB_ID" in env and _several(env, "SLURM_NTASKS"))
            or _several(env, "OMPI_COMM_WORLD_SIZE")
            or len(tpu_hosts) > 1
            or "MEGASCALE_COORDINATOR_ADDRESS" in env
            or env.get(ENV_AUTO, "").lower() == "auto")


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            env: Mapping[str, str] | None = None) -> Settings:
    """Where this process's distributed settings come from (no side effects)."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = _int(num_processes, "num_processes") if num_processes is not None else _int(
        env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    process_id = _int(process_id, "process_id") if process_id is not None else _int(
        env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        return Settings("auto" if _cluster_launched(env) else "single")
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"distributed settings incomplete: {', '.join(missing)} not set (flags --coordinator, "
                         f"--num_processes, --process_id or env {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                         f"{ENV_PROCESS_ID})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, num_processes={num_processes})")
    if ":" not in coordinator:
        raise ValueError(f"coordinator {coordinator!r} is not host:port")
    if num_processes == 1:
        return Settings("single")
    return Settings("explicit", coordinator, num_processes, process_id)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Settings:
    """Initialise ``jax.distributed`` if this job has several processes; call before any other JAX use.
    Calling it again in an initialised process does nothing."""
    settings = resolve(coordinator, num_processes, process_id)
    if settings.mode == "single" or jax.distributed.is_initialized():
        return settings
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.mode == "explicit":
        jax.distributed.initialize(coordinator_address=settings.coordinator,
                                   num_processes=settings.num_processes, process_id=settings.process_id)
    else:
        jax.distributed.initialize()
    return settings


def say(message: str) -> None:
    """A progress message on stderr, from process 0 only (one voice in multi-host runs)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
