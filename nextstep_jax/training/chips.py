"""TPU chips as the planner and the trainer's MFU see them: memory XLA lets one program use (as its
out-of-memory message states), and peak dense bf16 FLOP/s."""

from __future__ import annotations

CHIPS = {
    "v4": {"memory_bytes": int(15.25 * 2**30), "peak_flops": 275e12},
    "v5e": {"memory_bytes": int(15.75 * 2**30), "peak_flops": 197e12},
    "v5p": {"memory_bytes": int(95.74 * 2**30), "peak_flops": 459e12},
    "v6e": {"memory_bytes": int(31.25 * 2**30), "peak_flops": 918e12},
}

# jax's device_kind prefixes, most specific first ("TPU v5 lite" is a v5e, "TPU v5" a v5p).
_KINDS = (("tpu v4", "v4"), ("tpu v5 lite", "v5e"), ("tpu v5", "v5p"), ("tpu v6 lite", "v6e"))


def chip_of(device_kind: str) -> str | None:
    """The CHIPS name of a jax ``device_kind`` such as "TPU v5 lite", or None for other devices."""
    kind = device_kind.lower()
    return next((chip for prefix, chip in _KINDS if kind.startswith(prefix)), None)
