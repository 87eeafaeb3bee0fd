"""Triton kernels for the element-wise glue of a decoder layer on GPU.

A decode step of a 32-layer model runs some 700 small kernels when every RMSNorm is five torch
ops (square, mean, rsqrt, two products) and SiLU·up three; at batch 1 their launch latency
(a few µs each, even replayed from a CUDA graph) is a sizeable share of a step that should be
bound by reading the weights. These kernels cut that to one launch per op, the same fusions the
C++ path has (`cpu_linear.add_rms_norm`, `cpu_linear.silu_mul`):

- ``add_rms_norm(h, delta, weight, eps)``: ``h += delta`` in place (the residual stream), then
  ``weight * rmsnorm(h)``; one program per row.
- ``silu_mul(gate_up)``: ``silu(gate) * up`` for ``gate_up = [gate | up]``; programs over
  (row, block of channels).

Numerics follow `modegpt_rt.model.rms_norm`: statistics in float32 (float64 for float64 inputs),
the normalised row cast back to the input dtype before the weight product.
"""

from __future__ import annotations

import torch

from .triton_attention import _IMPORT_ERROR, _check_runnable, _compute_dtype, tl, triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _add_rms_norm_kernel(
    h_ptr, d_ptr, w_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    offs = row * n + cols
    x = tl.load(h_ptr + offs, mask=mask, other=0.0)
    # every product and sum in COMPUTE, rounded to the storage dtype where torch rounds
    # (h + delta; the normalised row; its product with the weight)
    if HAS_DELTA:
        x = (x.to(COMPUTE) + tl.load(d_ptr + offs, mask=mask, other=0.0).to(COMPUTE)).to(x.dtype)
        tl.store(h_ptr + offs, x, mask=mask)
    xf = x.to(COMPUTE)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(COMPUTE)
    tl.store(out_ptr + offs, (w * (xf * inv).to(x.dtype).to(COMPUTE)).to(x.dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, k, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < k
    gate = tl.load(x_ptr + row * 2 * k + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * k + k + cols, mask=mask, other=0.0).to(COMPUTE)
    g = gate.to(COMPUTE)
    tl.store(out_ptr + row * k + cols, (g / (1.0 + tl.exp(-g)) * up).to(gate.dtype), mask=mask)


def _check(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} not supported (float16, bfloat16, float32, float64)")
    if not x.is_contiguous():
        raise ValueError(f"{name}: needs a contiguous tensor")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta (in place, when given); returns weight * RMSNorm(h). h, delta: [..., n]; weight: [n]."""
    tensors = (h, weight) if delta is None else (h, delta, weight)
    _check_runnable(*tensors)
    for name, x in zip(("h", "delta", "weight") if delta is not None else ("h", "weight"), tensors):
        _check(name, x)
    n = h.shape[-1]
    if weight.shape != (n,) or (delta is not None and delta.shape != h.shape) or len({x.dtype for x in tensors}) > 1:
        raise ValueError(
            f"add_rms_norm: h {tuple(h.shape)}, delta {None if delta is None else tuple(delta.shape)}, "
            f"weight {tuple(weight.shape)} must agree in shape and dtype"
        )
    out = torch.empty_like(h)
    rows = h.numel() // max(n, 1)
    if rows:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](
            h,
            h if delta is None else delta,
            weight,
            out,
            n,
            float(eps),
            HAS_DELTA=delta is not None,
            BLOCK=block,
            COMPUTE=_compute_dtype(h.dtype),
            num_warps=max(1, min(16, block // 256)),
        )
    return out


def silu_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension ([..., 2k] -> [..., k])."""
    _check_runnable(gate_up)
    _check("gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dimension {gate_up.shape[-1]} is not [gate | up]")
    k = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], k, dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.numel() // max(2 * k, 1)
    if rows and k:
        block = min(block, triton.next_power_of_2(k))
        _silu_mul_kernel[(rows, triton.cdiv(k, block))](
            gate_up, out, k, BLOCK=block, COMPUTE=_compute_dtype(gate_up.dtype), num_warps=4
        )
    return out


def available() -> bool:
    from .triton_attention import available as attention_available

    return _IMPORT_ERROR is None and attention_available()
