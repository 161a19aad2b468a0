"""The one dtype table (checkpoints.dtypes) against torch's own sizes and the streaming reader."""

from __future__ import annotations

import pytest
import torch

from warmstart.checkpoints import DTYPE_SIZES
from warmstart.checkpoints.dtypes import FLOAT_DTYPES, TABLE, st_to_torch, torch_float, torch_to_st
from warmstart.checkpoints.streaming import ST_DTYPES, TORCH_TO_ST
from warmstart.errors import ConfigError

# safetensors' own names (safetensors/src/tensor.rs Dtype) and bytes per element, written out here
SAFETENSORS = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def test_sizes_are_safetensors_sizes():
    assert DTYPE_SIZES == SAFETENSORS


def test_torch_dtypes_have_the_table_size():
    for st, dt in st_to_torch().items():
        assert dt.itemsize == DTYPE_SIZES[st], st
    assert torch_to_st() == {v: k for k, v in st_to_torch().items()}
    assert set(st_to_torch()) == {k for k, (_, name) in TABLE.items() if name}


def test_streaming_reads_the_same_table():
    assert ST_DTYPES == st_to_torch() and TORCH_TO_ST == torch_to_st()
    assert ST_DTYPES["BF16"] is torch.bfloat16 and ST_DTYPES["F8_E4M3"] is torch.float8_e4m3fn
    assert all(ST_DTYPES[k].is_floating_point for k in FLOAT_DTYPES)


@pytest.mark.parametrize("name,want", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                       ("torch.float16", torch.float16), ("FP32", torch.float32),
                                       ("float64", torch.float64), (None, None)])
def test_user_names(name, want):
    assert torch_float(name) is want


def test_unknown_user_name_is_one_error():
    with pytest.raises(ConfigError, match="int4"):
        torch_float("int4")
