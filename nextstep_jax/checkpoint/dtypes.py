"""The one dtype table of the checkpoint formats: safetensors names, numpy dtypes, torch storage classes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["CAST_TARGETS", "DTYPES", "DTYPE_NAMES", "FLOAT_NAMES", "TORCH_STORAGE_DTYPES", "dtype_name"]

# In the order of the safetensors ``Dtype`` enum: the library lays tensors out by descending enum rank, then
# by name, and our writer copies that so that our exports are byte-identical to the library's.
_TABLE = (
    # safetensors name, numpy dtype, torch storage class, floating point
    ("BOOL", np.bool_, "BoolStorage", False),
    ("U8", np.uint8, "ByteStorage", False),
    ("I8", np.int8, "CharStorage", False),
    ("I16", np.int16, "ShortStorage", False),
    ("F16", np.float16, "HalfStorage", True),
    ("BF16", ml_dtypes.bfloat16, "BFloat16Storage", True),
    ("I32", np.int32, "IntStorage", False),
    ("F32", np.float32, "FloatStorage", True),
    ("F64", np.float64, "DoubleStorage", True),
    ("I64", np.int64, "LongStorage", False),
)

DTYPES: dict[str, np.dtype] = {name: np.dtype(dtype) for name, dtype, _, _ in _TABLE}
DTYPE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_NAMES = frozenset(name for name, _, _, floating in _TABLE if floating)
# ``torch.UntypedStorage`` holds raw bytes.
TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {storage: np.dtype(dtype) for _, dtype, storage, _ in _TABLE} | {
    "UntypedStorage": np.dtype(np.uint8)}
# What a conversion may cast floating-point parameters to (``--dtype``): numpy name -> safetensors name.
CAST_TARGETS: dict[str, str] = {DTYPES[name].name: name for name in ("F32", "BF16", "F16")}


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy dtype."""
    return DTYPE_NAMES[np.dtype(dtype)]
