"""The one dtype table: safetensors dtype names, their sizes, their torch dtypes, and user-facing names.

Everything in warmstart that turns a safetensors dtype string ("BF16") into bytes per element or a
torch dtype, or a name a user types ("bf16", "float16") into a torch dtype, reads this table. torch is
imported only by the functions that need it, so reading a header stays cheap.
"""

from __future__ import annotations

from functools import cache

from ..errors import ConfigError

# safetensors name -> (bytes per element, torch dtype attribute). Every dtype a header may carry; the
# unsigned 16/32/64-bit ones have no torch dtype warmstart reads (torch's support for them is partial),
# so a header may carry them but a tensor of that dtype is refused when read for merging.
TABLE: dict[str, tuple[int, str | None]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "U16": (2, None), "U32": (4, None), "U64": (8, None), "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
DTYPE_SIZES = {k: size for k, (size, _) in TABLE.items()}
# The float dtypes that are merged and transferred as they are (FP8 is read as float32: see streaming).
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# What a user may type for a float dtype (flags, plans, configs) -> the torch dtype attribute.
FLOAT_NAMES = {"float32": "float32", "fp32": "float32", "float64": "float64", "fp64": "float64",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


@cache
def st_to_torch() -> dict:
    """safetensors name -> torch dtype, for every dtype warmstart reads."""
    import torch

    return {k: getattr(torch, name) for k, (_, name) in TABLE.items() if name is not None}


@cache
def torch_to_st() -> dict:
    return {v: k for k, v in st_to_torch().items()}


def torch_float(name: str | None):
    """A user-facing float dtype name ("bf16", "torch.float16", ...) -> torch dtype; None stays None."""
    import torch

    if name is None:
        return None
    key = FLOAT_NAMES.get(str(name).lower().replace("torch.", ""))
    if key is None:
        raise ConfigError(f"unknown dtype {name!r}", hint="use float32, bfloat16, float16 or float64")
    return getattr(torch, key)


__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "FLOAT_NAMES", "TABLE", "st_to_torch", "torch_float", "torch_to_st"]
