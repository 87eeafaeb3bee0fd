"""Attention kernels behind one interface.

`attention(...)` applies RoPE to the new queries and keys with the cos/sin rows of
each KV group's kept rotary frequencies, appends keys (after RoPE) and values to
the KV cache, and computes causal attention with value heads narrower than
query/key heads. Implementations:

- ``torch``: the plain-torch reference (any device, any dtype), `reference.py`;
- ``cpu``: the pybind11 C++ kernel (`csrc/attention.cpp`), float32/float64 on CPU;
- ``triton``: the Triton kernels (`triton_attention.py`) for CUDA tensors.

Shapes (B batch, T new tokens, H query heads, H_kv KV heads, S cache capacity):
    q: [B, T, H, d_qk]   k: [B, T, H_kv, d_qk]   v: [B, T, H_kv, d_v]
    k_cache: [B, H_kv, S, d_qk]  v_cache: [B, H_kv, S, d_v]
    cos, sin: [P, head_dim/2] full rotary tables; freq_idx: [H_kv, d_qk/2] int
    cache_lens: [B] int32, tokens already cached; new_lens: [B] int32, valid new tokens
    returns out: [B, T, H, d_v]; rows t >= new_lens[b] are zero.
Token t of sequence b sits at position cache_lens[b] + t.
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("torch", "cpu", "triton")


def _cpu_available() -> bool:
    try:
        from . import cpu
    except ImportError:
        return False
    return cpu.available()


def _triton_available() -> bool:
    try:
        from . import triton_attention
    except ImportError:
        return False
    return triton_attention.available()


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo flags).
    Without it bfloat16 matmuls are emulated and no faster than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_native_bfloat16(device) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CPU with AVX512-BF16 or AMX-BF16, an NVIDIA GPU of compute
    capability 8 (Ampere) or later. (`torch.cuda.is_bf16_supported()` also says yes where bfloat16 is only
    emulated, e.g. on a V100 or T4, and asks about the current GPU rather than `device`.)"""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_has_native_bfloat16()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return False


def fast_eval_dtype(device="cpu") -> torch.dtype:
    """`--dtype auto` of scoring: bfloat16 where `device` multiplies it natively, else float32."""
    return torch.bfloat16 if has_native_bfloat16(device) else torch.float32


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Pick the implementation for `device`; 'auto' prefers the fast path that exists."""
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get("MODEGPT_BACKEND", "auto")
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        if device.type == "cpu" and dtype in (torch.float32, torch.float64) and _cpu_available():
            return "cpu"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError("backend 'cpu' (C++ kernel) needs a CPU device")
        if not _cpu_available():
            from . import cpu

            raise RuntimeError(f"backend 'cpu' requested but the C++ extension is unavailable: {cpu.load_error()}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"backend 'cpu' (C++ kernel) handles float32/float64, not {dtype}")
    if backend == "triton" and not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
    return backend


def attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale, backend="torch"):
    if backend == "torch":
        return reference.attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
    if backend == "cpu":
        from . import cpu

        return cpu.attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
    if backend == "triton":
        from . import triton_attention

        return triton_attention.attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
    raise ValueError(f"unknown attention backend {backend!r}")
