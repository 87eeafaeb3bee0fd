"""Torch front end of the C++ skinny matrix product (`csrc/linear.cpp`) used by the decode step.

`linear(x, w)` == `torch.nn.functional.linear(x, w)` for float32 CPU tensors with few rows
(x: [..., K], w: [N, K] contiguous). It reads each weight row once for all rows of x, which
is what bounds batch-1..8 decoding; larger products (prefill) stay with torch/MKL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import _cpu_linear as _ext
except Exception:  # noqa: BLE001 - ImportError, or OSError when libgomp is missing
    _ext = None

MAX_ROWS = 16  # above this, MKL's GEMM wins


def available() -> bool:
    return _ext is not None


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if (_ext is None or rows > MAX_ROWS or x.dtype != torch.float32 or w.dtype != torch.float32
            or x.device.type != "cpu" or not w.is_contiguous()):
        return F.linear(x, w)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, w is {list(w.shape)}")
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)
    _ext.linear(x.data_ptr(), w.data_ptr(), out.data_ptr(), rows, w.shape[1], w.shape[0])
    return out
