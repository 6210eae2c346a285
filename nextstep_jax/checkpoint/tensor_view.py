"""The one read-only view through which every checkpoint format is read, tensor by tensor.

A view holds keys as spelled in the files, shapes and dtypes from headers, and reads one tensor at a time
in the release (PyTorch) layout and its stored dtype. Implemented by ``release.safetensors.SafetensorsView``,
``release.torch_pickle.TorchPickleView`` and ``converted.store.ConvertedView``; they subclass the Protocol
for its context-manager methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["TensorView"]


class TensorView(Protocol):
    path: Path
    kind: str | None  # "nextstep", "vae", or None for bare tensors
    schema: str | None  # release config schema ("1.0", "1.1") or None
    format: str  # one line for humans

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> np.dtype: ...

    def read(self, key: str) -> np.ndarray: ...

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
