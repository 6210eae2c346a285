"""The per-step throughput figures of a NextStep run: tokens/s, images/s, the model FLOP rate and MFU, and the
data pipeline's counts, all summed over processes."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from nextstep_jax.training.chips import peak_flops_of
from nextstep_jax.training.flops import train_step_flops


def peak_flops(config) -> float | None:
    """Peak FLOP/s of one device: the config's, else the chip's (``training/chips.py``), else unknown."""
    if config.peak_flops_per_device:
        return float(config.peak_flops_per_device)
    return peak_flops_of(jax.devices()[0].device_kind)


class StepMeter:
    """tokens/s (the batch's token slots; data/pad_fraction says how many are padding), images/s (image
    blocks in the batch), the model FLOP rate and MFU (``training/flops.py``'s useful work, with the batch's
    own image targets), and the data pipeline's cumulative counts."""

    def __init__(self, config, data_config, model_cfg):
        self._boi, self._placeholder = int(model_cfg.boi), int(model_cfg.image_placeholder_id)
        rows, seq = int(config.data.batch_size), int(data_config.seq_len)
        self._rows, self._tokens = rows, rows * seq
        # The count is linear in the image targets per row: its value at 0 and its slope, in one call.
        at_zero, at_one = train_step_flops(model_cfg, rows, seq, image_targets=np.array([0.0, 1.0]))["model"]
        self._flops = (float(at_zero), float(at_one - at_zero))
        peak = peak_flops(config)
        self._peak = None if peak is None else peak * jax.device_count()

    def measure(self, local_batch, data_metrics: dict, seconds: float) -> dict:
        skipped_data = sum(v for k, v in data_metrics.items() if k.startswith("data/skipped/"))
        ids = local_batch["input_ids"]
        counts = np.array([(ids == self._boi).sum(), (ids == self._placeholder).sum(), skipped_data,
                           data_metrics["data/documents"]], np.float64)
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        flops = self._flops[0] + self._flops[1] * counts[1] / self._rows
        values = {"step_time": seconds, "tokens_per_s": self._tokens / seconds,
                  "images_per_s": float(counts[0]) / seconds, "model_tflops_per_s": flops / seconds / 1e12,
                  "data/skipped": float(counts[2]), "data/documents": float(counts[3]),
                  "data/pad_fraction": data_metrics["data/pad_fraction"]}
        if self._peak:
            values["mfu"] = flops / seconds / self._peak
        return values
