"""Torch front end of the C++ skinny matrix product (`csrc/linear.cpp`) used by the decode step.

`linear(x, w)` == `torch.nn.functional.linear(x, w)` for float32 CPU tensors with few rows
(x: [..., K], w: [N, K] contiguous). It reads each weight row once for all rows of x, which
is what bounds batch-1..8 decoding; larger products (prefill) stay with torch/MKL. `w` may also
be bfloat16 (x and the result stay float32): the kernel widens each weight as it reads it, so a
step reads half the bytes and computes what float32 weights of the same values would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import _cpu_linear as _ext
except Exception:  # noqa: BLE001 - ImportError, or OSError when libgomp is missing
    _ext = None

MAX_ROWS = 16  # above this, MKL's GEMM wins
# bfloat16 weights: MKL needs them widened to float32 first (a full copy per call), so the kernel stays ahead
# longer: to 32 rows, and to 128 for matrices beyond the caches such as an LM head. Weights streamed from
# DRAM, two threads (`python -m modegpt_rt.bench.skinny_linear --shape 49152x576 --rows 17,64,128,256
# --threads 2 --mb 200 --rounds 3 --widened`, bench/results/skinny_linear_rows_{lmhead,down}.json): the LM
# head at 64 rows takes 54.8 ms in the kernel against 103.9 widened, at 256 rows 148.0 against 145.4; the
# 576 x 1536 down projection at 64 rows 2.12 against 2.06.
BF16_MAX_ROWS, BF16_LARGE_MAX_ROWS, BF16_LARGE = 32, 128, 4_000_000


def available() -> bool:
    return _ext is not None


def _max_rows(w: torch.Tensor) -> int:
    if w.dtype != torch.bfloat16:
        return MAX_ROWS
    return BF16_LARGE_MAX_ROWS if w.numel() >= BF16_LARGE else BF16_MAX_ROWS


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if (
        _ext is None
        or x.numel() == 0
        or w.numel() == 0
        or x.numel() // x.shape[-1] > _max_rows(w)
        or x.dtype != torch.float32
        or w.dtype not in (torch.float32, torch.bfloat16)
        or x.device.type != "cpu"
        or w.device.type != "cpu"
        or not w.is_contiguous()
    ):
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, w is {list(w.shape)}")
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)
    bf16 = w.dtype == torch.bfloat16
    _ext.linear(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], w.shape[1], w.shape[0], bf16)
    return out


def _check_f32(name: str, t: torch.Tensor, shape=None):
    """The C++ helpers read raw float32 memory: anything else would be misread or overrun."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta (in place, when given); returns RMSNorm(h) * weight. Contiguous float32 CPU tensors."""
    n = h.shape[-1]
    _check_f32("add_rms_norm: h", h)
    _check_f32("add_rms_norm: weight", weight, (n,))
    if delta is not None:
        _check_f32("add_rms_norm: delta", delta, h.shape)
    out = torch.empty_like(h)
    rows = h.numel() // h.shape[-1]
    _ext.add_rms_norm(
        h.data_ptr(),
        0 if delta is None else delta.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        h.shape[-1],
        eps,
    )
    return out


def decode_plan(layer_ptrs, layer_widths, **kw):
    """A C++ `DecodePlan`: every layer of a float32 decode step in one call (see csrc/linear.cpp).

    layer_ptrs: per layer the data pointers of [attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down,
    k_cache, v_cache, freq_idx]; layer_widths: per layer [d_qk, d_v, k_mlp]. The caller keeps
    those tensors alive and unchanged while the plan is used. `weights_bf16=True`: the four
    matrices of every layer are bfloat16 (everything else float32).
    """
    return _ext.DecodePlan(layer_ptrs, layer_widths, **kw)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim (contiguous float32)."""
    _check_f32("silu_mul: gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: gate_up's last dim must be even, got {gate_up.shape[-1]}")
    k = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], k, dtype=gate_up.dtype)
    _ext.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], k)
    return out
