"""Accelerators as the planner and the trainer's MFU see them: for TPU chips, the memory XLA lets one program
use (as its out-of-memory message states) and the peak dense bf16 FLOP/s; for GPUs, the peak only."""

from __future__ import annotations

CHIPS = {
    "v4": {"memory_bytes": int(15.25 * 2**30), "peak_flops": 275e12},
    "v5e": {"memory_bytes": int(15.75 * 2**30), "peak_flops": 197e12},
    "v5p": {"memory_bytes": int(95.74 * 2**30), "peak_flops": 459e12},
    "v6e": {"memory_bytes": int(31.25 * 2**30), "peak_flops": 918e12},
}

# Dense bf16 FLOP/s of GPUs by the vendor's datasheets (SXM parts), by jax's device_kind.
GPU_PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12}

# jax's device_kind prefixes, most specific first ("TPU v5 lite" is a v5e, "TPU v5" a v5p).
_KINDS = (("tpu v4", "v4"), ("tpu v5 lite", "v5e"), ("tpu v5", "v5p"), ("tpu v6 lite", "v6e"))


def chip_of(device_kind: str) -> str | None:
    """The CHIPS name of a jax ``device_kind`` such as "TPU v5 lite", or None for other devices."""
    kind = device_kind.lower()
    return next((chip for prefix, chip in _KINDS if kind.startswith(prefix)), None)


def peak_flops_of(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this jax ``device_kind``; None when unknown (e.g. CPUs)."""
    chip = chip_of(device_kind)
    return CHIPS[chip]["peak_flops"] if chip else GPU_PEAK_FLOPS.get(device_kind)
