"""Torch front end of the C++ CPU attention kernel (`csrc/attention.cpp`).

`attention(...)` has the signature and semantics of `reference.attention` (shapes in
kernels/__init__.py). It hands numpy views of the CPU tensors to the extension, which writes
the KV cache in place and fills a freshly allocated `out`. float32 and float64 only: q, k, v
and both caches share one dtype; cos/sin are converted to it, freq_idx/cache_lens/new_lens to
int32 (pass int32 lens, as the interface says, to skip a conversion per call).

The rotary tables and freq_idx are treated as long-lived: their converted copies are cached
per (cos, sin, freq_idx) objects, so the decode loop does not convert them on every call.
"""

from __future__ import annotations

import numpy as np
import torch  # before the extension: it then shares torch's OpenMP runtime (one thread pool)

try:
    from . import _cpu_attention as _ext

    _LOAD_ERROR: str | None = None
except Exception as exc:  # ImportError, or OSError when libgomp is missing
    _ext = None
    _LOAD_ERROR = (
        f"{type(exc).__name__}: {exc} (build it with `pip install --no-build-isolation --no-deps -e .` "
        "from the repository root)"
    )

_F32, _F64, _I32 = torch.float32, torch.float64, torch.int32
_NP_DTYPES = {_F32: np.float32, _F64: np.float64}

# (ids and data pointers of cos, sin, freq_idx; dtype) -> (cos_np, sin_np, fidx_np, checks, sources).
# An entry holds the source tensors (so their ids and memory cannot be reused while it exists);
# `checks` has the version counters of the tables it had to convert (an in-place edit of one
# makes it rebuild; unconverted tables are live views anyway).
_TABLES: dict[tuple, tuple] = {}
_TABLES_MAX = 512


def available() -> bool:
    """True when the compiled extension imported."""
    return _ext is not None


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    return _LOAD_ERROR


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _as_np(t: torch.Tensor, name: str, dtype: torch.dtype | None = None):
    """numpy view of `t` (converted to `dtype`, C-contiguous, on the CPU); slow path with clear errors."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the CPU attention kernel needs CPU tensors, got device {t.device}")
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous().numpy()


def _tables(cos, sin, freq_idx, dtype):
    try:
        key = (id(cos), id(sin), id(freq_idx), cos.data_ptr(), sin.data_ptr(), freq_idx.data_ptr(), dtype)
    except AttributeError:
        key = None  # not tensors: the build below says which
    hit = _TABLES.get(key)
    if hit is not None:
        for t, ver in hit[3]:
            if _version(t) != ver:
                break
        else:
            return hit
    checks = []
    arrays = []
    for t, name, want in ((cos, "cos", dtype), (sin, "sin", dtype), (freq_idx, "freq_idx", _I32)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not (t.device.type == "cpu" and t.dtype == want and t.is_contiguous()):
            checks.append((t, _version(t)))  # converted copy: watch the source for in-place edits
        arrays.append(t.detach().to(device="cpu", dtype=want).contiguous().numpy())
    entry = (arrays[0], arrays[1], arrays[2], tuple(checks), (cos, sin, freq_idx))
    if any(ver is None for _, ver in checks):
        return entry  # a converted copy of an inference tensor: no version counter to notice edits, so no cache
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.clear()
    _TABLES[key] = entry
    return entry


def _lens(t):
    if isinstance(t, torch.Tensor) and t.dtype == _I32 and t.device.type == "cpu":
        return t.contiguous().numpy()
    t = torch.as_tensor(t).detach()
    if t.numel() and (t.min() < 0 or t.max() >= 2**31):  # would wrap in the int32 cast
        raise ValueError(f"cache/new lengths must lie in [0, 2**31), got {t.min().item()}..{t.max().item()}")
    return t.to(device="cpu", dtype=_I32).contiguous().numpy()


def _checked_call(q, k, v, k_cache, v_cache, tables, cache_lens, new_lens, scale, out):
    """The same call with per-argument checks, so failures name the offending tensor."""
    dtype = q.dtype
    arrs = []
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q's {dtype} (shape {tuple(t.shape)})")
        arrs.append(_as_np(t, name))
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q's {dtype} (shape {tuple(t.shape)})")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the CPU attention kernel needs CPU tensors, got device {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous to be written in place (shape {tuple(t.shape)})")
        arrs.append(t.detach().numpy())
    _ext.attention(*arrs, tables[0], tables[1], tables[2], _lens(cache_lens), _lens(new_lens), scale, out.numpy())


def attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale):
    """Same contract as `reference.attention`; writes k_cache/v_cache in place, returns out [B, T, H, d_v]."""
    if _ext is None:
        raise RuntimeError(f"the C++ CPU attention kernel is unavailable: {_LOAD_ERROR}")
    np_dtype = _NP_DTYPES.get(q.dtype)
    if np_dtype is None:
        raise ValueError(f"q: the CPU attention kernel supports float32 and float64, got {q.dtype}")
    q_shape, v_shape = q.shape, v.shape
    if len(q_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"q, v: expected 4-d tensors, got q {tuple(q_shape)} and v {tuple(v_shape)}")
    tables = _tables(cos, sin, freq_idx, q.dtype)
    # `out` comes from numpy: cheaper than torch.empty(dtype=...) followed by .numpy() on the hot path.
    out_np = np.empty((q_shape[0], q_shape[1], q_shape[2], v_shape[3]), np_dtype)
    out = torch.from_numpy(out_np)
    scale = float(scale)
    try:
        # Fast path: q/k/v may be strided views (made contiguous here); the caches must already
        # be contiguous CPU tensors of q's dtype, which the extension checks.
        q_np = q.contiguous().numpy()
        k_np = k.contiguous().numpy()
        v_np = v.contiguous().numpy()
        kc_np = k_cache.numpy()
        vc_np = v_cache.numpy()
        cl_np = cache_lens.numpy() if cache_lens.dtype is _I32 and cache_lens.is_contiguous() else _lens(cache_lens)
        nl_np = new_lens.numpy() if new_lens.dtype is _I32 and new_lens.is_contiguous() else _lens(new_lens)
    except (TypeError, RuntimeError, AttributeError):  # CUDA tensor, requires_grad, non-tensor, ...
        _checked_call(q, k, v, k_cache, v_cache, tables, cache_lens, new_lens, scale, out)
        return out
    _ext.attention(q_np, k_np, v_np, kc_np, vc_np, tables[0], tables[1], tables[2], cl_np, nl_np, scale, out_np)
    return out
