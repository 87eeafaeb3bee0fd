"""Triton kernels for the attention op; shapes and semantics are in `kernels/__init__.py`.

`attention(...)` has exactly the signature and semantics of `reference.attention` and runs
two or three launches:

1. ``_rope_append_kernel`` (one program per (sequence, new token), all KV heads at once):
   rotates the new keys with the gathered rows ``cos[pos, freq_idx[g, p]]`` /
   ``sin[...]`` and writes them, with the raw values, into ``k_cache`` / ``v_cache`` at
   ``pos = cache_lens[b] + t`` for ``t < new_lens[b]``. Nothing else in the caches is touched.
2. ``T > 1``: ``_prefill_kernel``, flash attention (online softmax) over the cache.
   ``T == 1``: ``_decode_split_kernel`` (flash-decoding: each program handles one KV group
   and one chunk of the cache) then, when there is more than one chunk,
   ``_decode_reduce_kernel`` merging the partial (max, sum, acc) triples.

How RoPE is fused
-----------------
Keys are rotated once, on their way into the cache (kernel 1); the attention kernels read
rotated keys straight from the cache. Queries are *not* written to a temporary buffer:
each attention program loads its query rows, gathers their cos/sin entries (the row of
the query's absolute position, the columns of its KV group's kept frequencies) and
rotates them in registers before the key loop. So there is no extra pass over q and no
"gather RoPE outside the kernel" cost, which is what made the compressed model of the
paper slower than the dense one at low compression.

A q/k head of width d_qk is laid out as [first halves | second halves] of its d_qk/2 kept
rotary pairs. The kernels keep that split: q and k are loaded as two halves of width
``BLOCK_P = max(16, next_power_of_2(d_qk / 2))`` (masked past d_qk/2) and the scores are
``q1 . k1 + q2 . k2``; values use ``BLOCK_DV = max(16, next_power_of_2(d_v))``. Widths
are runtime arguments, so every layer of a variable-rank model shares one compiled
kernel per power-of-two bucket.

GQA
---
Prefill programs own (sequence, KV group, block of BLOCK_M rows) where the rows enumerate
(token, query head of the group) pairs, so a K/V tile is loaded once for all G heads of
the group. Decode programs own (sequence, KV group, chunk): the query block is
[G_pad, BLOCK_P] x 2 with G padded to a power of two (to 16 when tensor-core dots are
used), so again each K/V tile [BLOCK_N, d] is read once per group.

Dots
----
``tl.dot`` needs inner dimensions >= 16 (fp16/bf16) on NVIDIA GPUs; BLOCK_P, BLOCK_N and
BLOCK_DV are always >= 16, and the row dimension is padded to 16 when dots are used.
Decode with G == 1 uses a broadcast-multiply-sum instead (a 1-row dot would waste 15/16
of the tensor-core work for nothing in a memory-bound kernel). ``use_dot`` on the
launchers overrides the choice (the tests run both paths).

Numerics
--------
Softmax statistics and accumulators are float32 for fp16/bf16/fp32 inputs and float64
for float64 inputs (``COMPUTE``); dots take operands in the query dtype (keys and values
are cast to it, like the reference) with ``input_precision="ieee"``, so fp32 inputs are
not silently run in tf32 and float64 inputs give float64 math (the interpreter runs it in
numpy float64; the tests compare with the reference at 1e-9; compiled on an H200 with
Triton 3.6 they pass at 1e-9 too). ``scale`` is a float64 kernel argument so that float64
runs are not limited by a float32 scale. One exception, seen on the H200: Triton's
compiler rewrites the multiply-sum of the *prefill* tile (``use_dot=False``, rows >= 16)
into a dot of TF32 precision (its CombineBroadcastMulReducePattern, triton-lang/triton
issue 9609), so float32 prefill with ``use_dot=False`` is TF32-accurate (1.7e-3 against
the reference). No default path takes it: prefill always uses ``tl.dot``, and decode's
multiply-sum (G == 1) has one row and stayed float32-exact there.

Launch configurations
---------------------
``prefill_config`` / ``decode_config`` pick tiles per dtype and head width. The prefill
key loop has an unmasked part (tiles every row of the block sees) and a masked part
along the causal diagonal. fp16/bf16 prefill: BLOCK_M x BLOCK_N = 128 x 64 with 8 warps
(64 x 32 for 256-wide heads); decode: 32 keys per tile, 4 warps. Timed on an H200
(``python -m modegpt_rt.bench.triton_kernels``, bench/results/triton_kernels_h200.json):
decode at batch 256, cache 512, LLaMA-2-7B heads reads K/V at 98% of the measured copy
bandwidth; a compressed head of d_qk = 88, d_v = 90 at 45%: its rows are off 16-byte
boundaries, so the compiler emits 2-byte loads. `Model.align_widths` pads such widths on a GPU
(rotary pairs and value dims to multiples of 8), and the launchers pass ``VEC = 8`` when every
width and row stride is a multiple of 8 (`vector_width`): the kernels rewrite those values as
``x // 8 * 8`` (`_multiple`), which tells the compiler what its own specialisation (multiples
of 16 only) cannot, and the loads become 16-byte vectors (checked in the PTX by
``python -m modegpt_rt.bench.triton_ptx``, no GPU needed). Under the interpreter all tiles are 16
wide so that small tests cover several tiles and splits.

Flash-decoding splits
---------------------
``choose_num_splits``: with B * H_kv programs already filling the GPU (>= 4 per SM) there
is one split and the split kernel writes the output directly (no reduce launch).
Otherwise the cache is cut into ``ceil(4 * SMs / (B * H_kv))`` splits, capped so every
split covers at least two BLOCK_N tiles of the cache capacity S, and at 64. The split
count is chosen on the host from S (no device sync on ``cache_lens``); inside the kernel
each split takes an equal, BLOCK_N-aligned share of *that sequence's* actual length, so
short sequences just leave their trailing splits empty.

Value checks (lengths within the cache, frequency indices within the tables) are done
for CPU tensors only: on CUDA they would cost a device sync per call.
"""

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as exc:  # triton is optional: available() is False and attention() raises

    class _MissingTriton:
        """Stand-in so the kernel definitions below still parse without triton."""

        float64 = None

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _MissingTriton()
    _IMPORT_ERROR = exc

# globals read inside @triton.jit functions must be constexpr
LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available() -> bool:
    """True when triton imports and there is somewhere to run it (CUDA or the interpreter)."""
    if _IMPORT_ERROR is not None:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _rope_rotate(x_ptrs, x_second_half, mask, cs_offsets, cos_ptr, sin_ptr, COMPUTE: tl.constexpr):
    """Load the two halves of rows of x (x_ptrs, x_ptrs + x_second_half) and rotate them.

    cs_offsets are the gathered cos/sin offsets (row = position, column = kept frequency).
    Masked entries come back as 0, so padded columns and invalid rows stay 0.
    """
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x_ptrs + x_second_half, mask=mask, other=0.0).to(COMPUTE)
    c = tl.load(cos_ptr + cs_offsets, mask=mask, other=0.0).to(COMPUTE)
    s = tl.load(sin_ptr + cs_offsets, mask=mask, other=0.0).to(COMPUTE)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _qk_scale(scale, COMPUTE: tl.constexpr):
    """scale * log2(e) in COMPUTE precision (scores go through exp2).

    `scale` is a float64 scalar on the GPU and a Python float under the interpreter;
    adding it to a COMPUTE zero keeps float64 precision in both (tl.cast would round a
    Python float through float32).
    """
    return (tl.zeros([], COMPUTE) + scale * LOG2E).to(COMPUTE)


@triton.jit
def _multiple(x, VEC: tl.constexpr):
    """x, which the launcher checked to be a multiple of VEC, rewritten so that the compiler knows it
    (its own specialisation only recognises multiples of 16): 16-byte vector loads for rows of
    8-aligned widths. Identity for VEC == 1."""
    if VEC > 1:
        x = x // VEC * VEC
    return x


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q1,
    q2,
    kc_ptr,
    vc_ptr,
    s_kn,
    s_kd,
    s_vn,
    s_vd,
    n0,
    n_end,
    pos,
    half,
    d_v,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    USE_DOT: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """One online-softmax step over cache positions [n0, n0 + BLOCK_N) for a block of rows.

    acc [ROWS, BLOCK_DV], m_i / l_i [ROWS] (m_i in log2 units), q1 / q2 [ROWS, BLOCK_P] the
    rotated query halves (query dtype when USE_DOT, else COMPUTE); kc_ptr / vc_ptr point at
    the cache of this (sequence, KV group). MASKED: keep only positions < n_end and
    <= pos[row] (causality); unmasked tiles must lie entirely below both.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_dv = tl.arange(0, BLOCK_DV)
    if MASKED:
        n_ok = offs_n < n_end
        kt_mask = (offs_p < half)[:, None] & n_ok[None, :]
        v_mask = n_ok[:, None] & (offs_dv < d_v)[None, :]
    else:
        kt_mask = (offs_p < half)[:, None]
        v_mask = (offs_dv < d_v)[None, :]
    # keys are loaded transposed, [BLOCK_P, BLOCK_N], ready for q @ k^T
    kt_ptrs = kc_ptr + offs_n[None, :] * s_kn + offs_p[:, None] * s_kd
    k1t = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
    k2t = tl.load(kt_ptrs + half * s_kd, mask=kt_mask, other=0.0)
    v = tl.load(vc_ptr + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd, mask=v_mask, other=0.0)

    if USE_DOT:
        s = tl.dot(q1, k1t.to(q1.dtype), input_precision="ieee", out_dtype=COMPUTE)
        s = tl.dot(q2, k2t.to(q2.dtype), s, input_precision="ieee", out_dtype=COMPUTE)
    else:
        s = tl.sum(q1[:, :, None] * k1t.to(COMPUTE)[None, :, :], axis=1)
        s += tl.sum(q2[:, :, None] * k2t.to(COMPUTE)[None, :, :], axis=1)
    s = s * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, NEG_INF)

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if USE_DOT:
        acc = tl.dot(p.to(q1.dtype), v.to(q1.dtype), acc, input_precision="ieee", out_dtype=COMPUTE)
    else:
        acc += tl.sum(p[:, :, None] * v.to(COMPUTE)[None, :, :], axis=1)
    return acc, m_new, l_i


# --------------------------------------------------------------------------------------
# Phase 1: RoPE on the new keys + KV-cache append
# --------------------------------------------------------------------------------------


@triton.jit
def _rope_append_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    cos_ptr,
    sin_ptr,
    fidx_ptr,
    cache_lens_ptr,
    new_lens_ptr,
    T,
    H_KV,
    HALF,
    D_V,
    CAPACITY,
    N_ROPE_ROWS,
    ROPE_STRIDE,
    s_kb,
    s_kt,
    s_kh,
    s_kd,
    s_vb,
    s_vt,
    s_vh,
    s_vd,
    s_kcb,
    s_kch,
    s_kcs,
    s_kcd,
    s_vcb,
    s_vch,
    s_vcs,
    s_vcd,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    COMPUTE: tl.constexpr,
    VEC: tl.constexpr = 1,
):
    """Program (b * T + t): rotate k[b, t] (all KV heads) and append it and v[b, t] to the caches."""
    HALF, D_V = _multiple(HALF, VEC), _multiple(D_V, VEC)
    s_kb, s_kt, s_kh = _multiple(s_kb, VEC), _multiple(s_kt, VEC), _multiple(s_kh, VEC)
    s_vb, s_vt, s_vh = _multiple(s_vb, VEC), _multiple(s_vt, VEC), _multiple(s_vh, VEC)
    s_kcb, s_kch, s_kcs = _multiple(s_kcb, VEC), _multiple(s_kch, VEC), _multiple(s_kcs, VEC)
    s_vcb, s_vch, s_vcs = _multiple(s_vcb, VEC), _multiple(s_vch, VEC), _multiple(s_vcs, VEC)
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    pos = tl.load(cache_lens_ptr + b) + t
    valid = (t < tl.load(new_lens_ptr + b)) & (pos < CAPACITY)
    n_heads = tl.where(valid, H_KV, 0)  # heads to write: all or none

    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    offs_dv = tl.arange(0, BLOCK_DV)
    hp_mask = (offs_h < n_heads)[:, None] & (offs_p < HALF)[None, :]
    hv_mask = (offs_h < n_heads)[:, None] & (offs_dv < D_V)[None, :]

    fidx = tl.load(fidx_ptr + offs_h[:, None] * HALF + offs_p[None, :], mask=hp_mask, other=0)
    rope_row = tl.minimum(pos, N_ROPE_ROWS - 1)
    k_ptrs = k_ptr + b * s_kb + t * s_kt + offs_h[:, None] * s_kh + offs_p[None, :] * s_kd
    k1, k2 = _rope_rotate(k_ptrs, HALF * s_kd, hp_mask, rope_row * ROPE_STRIDE + fidx, cos_ptr, sin_ptr, COMPUTE)

    kc_ptrs = kc_ptr + b * s_kcb + offs_h[:, None] * s_kch + pos * s_kcs + offs_p[None, :] * s_kcd
    tl.store(kc_ptrs, k1.to(kc_ptr.dtype.element_ty), mask=hp_mask)
    tl.store(kc_ptrs + HALF * s_kcd, k2.to(kc_ptr.dtype.element_ty), mask=hp_mask)

    v = tl.load(v_ptr + b * s_vb + t * s_vt + offs_h[:, None] * s_vh + offs_dv[None, :] * s_vd, mask=hv_mask)
    vc_ptrs = vc_ptr + b * s_vcb + offs_h[:, None] * s_vch + pos * s_vcs + offs_dv[None, :] * s_vcd
    tl.store(vc_ptrs, v.to(vc_ptr.dtype.element_ty), mask=hv_mask)


# --------------------------------------------------------------------------------------
# Phase 2a: prefill (T > 1)
# --------------------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    fidx_ptr,
    cache_lens_ptr,
    new_lens_ptr,
    scale: tl.float64,
    T,
    H_KV,
    HALF,
    D_V,
    N_ROPE_ROWS,
    ROPE_STRIDE,
    s_qb,
    s_qt,
    s_qh,
    s_qd,
    s_kcb,
    s_kch,
    s_kcs,
    s_kcd,
    s_vcb,
    s_vch,
    s_vcs,
    s_vcd,
    s_ob,
    s_ot,
    s_oh,
    s_od,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr,
    COMPUTE: tl.constexpr,
    VEC: tl.constexpr = 1,
):
    """Program (m block, b * H_kv + g): BLOCK_M rows of (token, query head of group g) pairs.

    Row r is token t = r // GROUP of query head g * GROUP + r % GROUP, at absolute position
    cache_lens[b] + t; it attends to cache positions <= that. Rows t >= new_lens[b] get 0.
    """
    HALF, D_V = _multiple(HALF, VEC), _multiple(D_V, VEC)
    s_qb, s_qt, s_qh = _multiple(s_qb, VEC), _multiple(s_qt, VEC), _multiple(s_qh, VEC)
    s_kcb, s_kch, s_kcs = _multiple(s_kcb, VEC), _multiple(s_kch, VEC), _multiple(s_kcs, VEC)
    s_vcb, s_vch, s_vcs = _multiple(s_vcb, VEC), _multiple(s_vch, VEC), _multiple(s_vcs, VEC)
    s_ob, s_ot, s_oh = _multiple(s_ob, VEC), _multiple(s_ot, VEC), _multiple(s_oh, VEC)
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // H_KV).to(tl.int64)
    g = pid_bg % H_KV
    cache_len = tl.load(cache_lens_ptr + b)
    n_new = tl.minimum(tl.load(new_lens_ptr + b), T)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUP
    heads = g * GROUP + rows % GROUP
    row_in = t < T
    row_valid = t < n_new
    pos = cache_len + t

    offs_p = tl.arange(0, BLOCK_P)
    offs_dv = tl.arange(0, BLOCK_DV)
    p_mask = offs_p < HALF
    fidx = tl.load(fidx_ptr + g * HALF + offs_p, mask=p_mask, other=0)
    q_mask = row_valid[:, None] & p_mask[None, :]
    q_ptrs = q_ptr + b * s_qb + t[:, None] * s_qt + heads[:, None] * s_qh + offs_p[None, :] * s_qd
    cs_offsets = tl.minimum(pos, N_ROPE_ROWS - 1)[:, None] * ROPE_STRIDE + fidx[None, :]
    q1, q2 = _rope_rotate(q_ptrs, HALF * s_qd, q_mask, cs_offsets, cos_ptr, sin_ptr, COMPUTE)
    if USE_DOT:
        q1 = q1.to(q_ptr.dtype.element_ty)
        q2 = q2.to(q_ptr.dtype.element_ty)
    qk_scale = _qk_scale(scale, COMPUTE)

    # Key range: [0, lo) is visible to every row of the block (no masks needed),
    # [lo, hi) needs the causal mask; hi = one past the last valid row's position.
    t_first = (pid_m * BLOCK_M) // GROUP
    t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
    any_valid = t_first < n_new
    lo = tl.where(any_valid, ((cache_len + t_first + 1) // BLOCK_N) * BLOCK_N, 0)
    hi = tl.where(any_valid, cache_len + t_last + 1, 0)

    kc_base = kc_ptr + b * s_kcb + g * s_kch
    vc_base = vc_ptr + b * s_vcb + g * s_vch
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=COMPUTE)
    m_i = tl.full([BLOCK_M], NEG_INF, dtype=COMPUTE)
    l_i = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for n0 in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1, q2, kc_base, vc_base, s_kcs, s_kcd, s_vcs, s_vcd,
            n0, hi, pos, HALF, D_V, qk_scale,
            BLOCK_N, BLOCK_P, BLOCK_DV, False, USE_DOT, COMPUTE,
        )  # fmt: skip
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1, q2, kc_base, vc_base, s_kcs, s_kcd, s_vcs, s_vcd,
            n0, hi, pos, HALF, D_V, qk_scale,
            BLOCK_N, BLOCK_P, BLOCK_DV, True, USE_DOT, COMPUTE,
        )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out = tl.where(row_valid[:, None], out, 0.0)
    out_ptrs = out_ptr + b * s_ob + t[:, None] * s_ot + heads[:, None] * s_oh + offs_dv[None, :] * s_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & (offs_dv < D_V)[None, :])


# --------------------------------------------------------------------------------------
# Phase 2b: decode (T == 1), flash-decoding
# --------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    cos_ptr,
    sin_ptr,
    fidx_ptr,
    cache_lens_ptr,
    new_lens_ptr,
    scale: tl.float64,
    H_KV,
    HALF,
    D_V,
    N_ROPE_ROWS,
    ROPE_STRIDE,
    s_qb,
    s_qh,
    s_qd,
    s_kcb,
    s_kch,
    s_kcs,
    s_kcd,
    s_vcb,
    s_vch,
    s_vcs,
    s_vcd,
    s_ob,
    s_oh,
    s_od,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr,
    COMPUTE: tl.constexpr,
    VEC: tl.constexpr = 1,
):
    """Program (b * H_kv + g, split): all GROUP query heads of KV group g over one cache chunk.

    With NUM_SPLITS == 1 it writes the normalised output; otherwise the partial
    (max in log2 units, sum, unnormalised acc) for `_decode_reduce_kernel`.
    """
    HALF, D_V = _multiple(HALF, VEC), _multiple(D_V, VEC)
    s_qb, s_qh = _multiple(s_qb, VEC), _multiple(s_qh, VEC)
    s_kcb, s_kch, s_kcs = _multiple(s_kcb, VEC), _multiple(s_kch, VEC), _multiple(s_kcs, VEC)
    s_vcb, s_vch, s_vcs = _multiple(s_vcb, VEC), _multiple(s_vch, VEC), _multiple(s_vcs, VEC)
    s_ob, s_oh = _multiple(s_ob, VEC), _multiple(s_oh, VEC)
    pid_bg = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bg // H_KV).to(tl.int64)
    g = pid_bg % H_KV
    cache_len = tl.load(cache_lens_ptr + b)
    has_query = tl.load(new_lens_ptr + b) > 0
    n_query_heads = tl.where(has_query, GROUP, 0)
    kv_len = tl.where(has_query, cache_len + 1, 0)  # the query at position cache_len sees 0..cache_len
    chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_P)
    offs_dv = tl.arange(0, BLOCK_DV)
    g_mask = offs_g < GROUP
    p_mask = offs_p < HALF
    dv_mask = offs_dv < D_V
    heads = g * GROUP + offs_g

    fidx = tl.load(fidx_ptr + g * HALF + offs_p, mask=p_mask, other=0)
    q_mask = (offs_g < n_query_heads)[:, None] & p_mask[None, :]
    q_ptrs = q_ptr + b * s_qb + heads[:, None] * s_qh + offs_p[None, :] * s_qd
    rope_row = tl.minimum(cache_len, N_ROPE_ROWS - 1)
    cs_offsets = rope_row * ROPE_STRIDE + fidx[None, :] + tl.zeros([BLOCK_G, 1], dtype=tl.int32)
    q1, q2 = _rope_rotate(q_ptrs, HALF * s_qd, q_mask, cs_offsets, cos_ptr, sin_ptr, COMPUTE)
    if USE_DOT:
        q1 = q1.to(q_ptr.dtype.element_ty)
        q2 = q2.to(q_ptr.dtype.element_ty)
    qk_scale = _qk_scale(scale, COMPUTE)
    pos = cache_len + tl.zeros([BLOCK_G], dtype=tl.int32)

    kc_base = kc_ptr + b * s_kcb + g * s_kch
    vc_base = vc_ptr + b * s_vcb + g * s_vch
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=COMPUTE)
    m_i = tl.full([BLOCK_G], NEG_INF, dtype=COMPUTE)
    l_i = tl.zeros([BLOCK_G], dtype=COMPUTE)
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1, q2, kc_base, vc_base, s_kcs, s_kcd, s_vcs, s_vcd,
            n0, end, pos, HALF, D_V, qk_scale,
            BLOCK_N, BLOCK_P, BLOCK_DV, True, USE_DOT, COMPUTE,
        )  # fmt: skip

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + b * s_ob + heads[:, None] * s_oh + offs_dv[None, :] * s_od
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & dv_mask[None, :])
    else:
        # partial buffers are [B * H, NUM_SPLITS] (+ [D_V]), row b * H + head
        part = (pid_bg.to(tl.int64) * GROUP + offs_g) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
        acc_ptrs = part_acc_ptr + part[:, None] * D_V + offs_dv[None, :]
        tl.store(acc_ptrs, acc, mask=g_mask[:, None] & dv_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    H,
    D_V,
    s_ob,
    s_oh,
    s_od,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Program b * H + h: merge the NUM_SPLITS partial softmax states of one query head."""
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < NUM_SPLITS
    dv_mask = offs_dv < D_V
    part = row * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + part, mask=s_mask, other=NEG_INF)
    l_s = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
    acc_mask = s_mask[:, None] & dv_mask[None, :]
    acc = tl.load(part_acc_ptr + part[:, None] * D_V + offs_dv[None, :], mask=acc_mask, other=0.0)

    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == NEG_INF, 0.0, m_max))  # empty splits weigh 0
    l_tot = tl.sum(w * l_s, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_dv * s_od, out.to(out_ptr.dtype.element_ty), mask=dv_mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _block(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)
    return 4  # the interpreter: a nominal small machine


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, h_kv: int, capacity: int, block_n: int, num_sms: int, max_splits: int = 64) -> int:
    """Flash-decoding split count: enough programs for >= 4 per SM, >= 2 tiles per split."""
    programs = batch * h_kv
    target = 4 * num_sms
    if programs >= target:
        return 1
    wanted = triton.cdiv(target, programs)
    useful = max(1, capacity // (2 * block_n))
    return int(max(1, min(wanted, useful, max_splits)))


def _check_runnable(*tensors: torch.Tensor) -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"triton is not importable: {_IMPORT_ERROR}")
    device = tensors[0].device
    for x in tensors:
        if x.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {x.device}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for testing)")


def _check_rope_tables(cos, sin, freq_idx, h_kv: int, half: int) -> None:
    if cos.dim() != 2 or cos.shape != sin.shape:
        shapes = f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        raise ValueError(f"cos and sin must be [P, head_dim/2] of one shape, got {shapes}")
    if not (cos.dtype.is_floating_point and sin.dtype.is_floating_point):
        raise ValueError("cos and sin must be floating point")
    if tuple(freq_idx.shape) != (h_kv, half):
        raise ValueError(f"freq_idx must be [H_kv={h_kv}, d_qk/2={half}], got {tuple(freq_idx.shape)}")
    if freq_idx.dtype.is_floating_point or freq_idx.dtype == torch.bool:
        raise ValueError(f"freq_idx must be an integer tensor, got {freq_idx.dtype}")
    if freq_idx.device.type == "cpu" and freq_idx.numel() and (freq_idx.min() < 0 or freq_idx.max() >= cos.shape[1]):
        raise ValueError(f"freq_idx entries must lie in [0, {cos.shape[1]})")


def _check_lens(cache_lens, new_lens, batch: int, t: int, capacity: int) -> None:
    for name, x in (("cache_lens", cache_lens), ("new_lens", new_lens)):
        if tuple(x.shape) != (batch,) or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape [{batch}], got {x.dtype} {tuple(x.shape)}")
    if cache_lens.device.type == "cpu" and batch:
        if cache_lens.min() < 0 or new_lens.min() < 0 or new_lens.max() > t:
            raise ValueError(f"need cache_lens >= 0 and 0 <= new_lens <= T={t}")
        if (cache_lens.long() + new_lens.long()).max() > capacity:
            raise ValueError(f"cache_lens + new_lens exceeds the cache capacity S={capacity}")


def _check_caches(k_cache, v_cache, batch: int, h_kv: int, d_qk: int, d_v: int) -> int:
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("k_cache and v_cache must be [B, H_kv, S, d]")
    capacity = k_cache.shape[2]
    if tuple(k_cache.shape) != (batch, h_kv, capacity, d_qk):
        raise ValueError(f"k_cache must be [B={batch}, H_kv={h_kv}, S, d_qk={d_qk}], got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape) != (batch, h_kv, capacity, d_v):
        want = f"[B={batch}, H_kv={h_kv}, S={capacity}, d_v={d_v}]"
        raise ValueError(f"v_cache must be {want}, got {tuple(v_cache.shape)}")
    if not (k_cache.dtype.is_floating_point and v_cache.dtype.is_floating_point):
        raise ValueError("the caches must be floating point")
    return capacity


def _check_query(q, d_v: int, h_kv: int):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, d_qk], got {tuple(q.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported; use one of {_SUPPORTED_DTYPES}")
    batch, t, h, d_qk = q.shape
    if d_qk < 2 or d_qk % 2:
        raise ValueError(f"d_qk must be even (whole rotary pairs), got {d_qk}")
    if h_kv < 1 or h % h_kv:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads H_kv={h_kv}")
    if d_v < 1:
        raise ValueError("d_v must be >= 1")
    return batch, t, h, d_qk


def rope_append(k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens) -> None:
    """Rotate k [B, T, H_kv, d_qk] and write it and v [B, T, H_kv, d_v] into the caches in place.

    Token t of sequence b goes to cache position cache_lens[b] + t if t < new_lens[b].
    """
    _check_runnable(k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens)
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k [B, T, H_kv, d_qk] and v [B, T, H_kv, d_v] disagree: {tuple(k.shape)}, {tuple(v.shape)}")
    batch, t, h_kv, d_qk = k.shape
    d_v = v.shape[3]
    if d_qk < 2 or d_qk % 2:
        raise ValueError(f"d_qk must be even (whole rotary pairs), got {d_qk}")
    if not (k.dtype.is_floating_point and v.dtype.is_floating_point):
        raise ValueError("k and v must be floating point")
    half = d_qk // 2
    capacity = _check_caches(k_cache, v_cache, batch, h_kv, d_qk, d_v)
    _check_rope_tables(cos, sin, freq_idx, h_kv, half)
    _check_lens(cache_lens, new_lens, batch, t, capacity)
    if batch * t == 0:
        return
    cos, sin, freq_idx = cos.contiguous(), sin.contiguous(), freq_idx.contiguous()
    compute = tl.float64 if torch.float64 in (k.dtype, k_cache.dtype) else tl.float32
    _rope_append_kernel[(batch * t,)](
        k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens,
        t, h_kv, half, d_v, capacity, cos.shape[0], cos.shape[1],
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_H=triton.next_power_of_2(h_kv), BLOCK_P=_block(half, 1), BLOCK_DV=_block(d_v, 1),
        COMPUTE=compute, VEC=vector_width(half, d_v, *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3],
                                          *v_cache.stride()[:3]), num_warps=4,
    )  # fmt: skip


def prefill_attention(
    q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale, out=None,
    block_m=None, block_n=None, use_dot=None, num_warps=None, num_stages=None,
):  # fmt: skip
    """Causal attention of rotated-in-kernel queries q [B, T, H, d_qk] over the caches.

    The caches must already hold the new keys/values (see `rope_append`). Returns (or fills)
    out [B, T, H, d_v]; rows t >= new_lens[b] are zero. Works for any T >= 1.
    """
    _check_runnable(q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens)
    h_kv, d_v = k_cache.shape[1], v_cache.shape[-1]
    batch, t, h, d_qk = _check_query(q, d_v, h_kv)
    half, group = d_qk // 2, h // h_kv
    capacity = _check_caches(k_cache, v_cache, batch, h_kv, d_qk, d_v)
    _check_rope_tables(cos, sin, freq_idx, h_kv, half)
    _check_lens(cache_lens, new_lens, batch, t, capacity)
    out = _output(out, q, d_v)
    if out.numel() == 0:
        return out
    cos, sin, freq_idx = cos.contiguous(), sin.contiguous(), freq_idx.contiguous()

    config = prefill_config(t, h, h_kv, d_qk, d_v, q.dtype, q.device)
    block_p, block_dv = config["BLOCK_P"], config["BLOCK_DV"]
    block_m = config["BLOCK_M"] if block_m is None else block_m
    block_n = config["BLOCK_N"] if block_n is None else block_n
    num_warps = config["num_warps"] if num_warps is None else num_warps
    num_stages = config["num_stages"] if num_stages is None else num_stages
    grid = (triton.cdiv(t * group, block_m), batch * h_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cos, sin, freq_idx, cache_lens, new_lens, float(scale),
        t, h_kv, half, d_v, cos.shape[0], cos.shape[1],
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_DV=block_dv,
        USE_DOT=True if use_dot is None else bool(use_dot), COMPUTE=_compute_dtype(q.dtype),
        VEC=vector_width(half, d_v, *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3]),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def vector_width(*values: int) -> int:
    """8 when every width and row stride handed to a kernel is a multiple of 8 elements (rows start on
    16-byte boundaries: the compiler may use vector loads, see `_multiple`), else 1."""
    return 8 if all(int(x) % 8 == 0 for x in values) else 1


def _on_gpu(device) -> bool:
    return torch.device(device).type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def prefill_config(t: int, h: int, h_kv: int, d_qk: int, d_v: int, dtype: torch.dtype, device) -> dict:
    """Default prefill launch parameters (tiles sized so K/V stages fit shared memory)."""
    block_p, block_dv = _block(d_qk // 2), _block(d_v)
    config = {"BLOCK_P": block_p, "BLOCK_DV": block_dv, "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if not _on_gpu(device):  # the interpreter: small tiles so small tests cover several of them
        return config
    wide = 2 * block_p + block_dv > 384
    rows = _block(t * (h // h_kv))
    if dtype.itemsize <= 2:  # (128, 64) x 8 warps for d <= 128; (64, 32) x 8 warps for d = 256
        block_m = min(64 if wide else 128, rows)
        config.update(BLOCK_M=block_m, BLOCK_N=32 if wide else 64, num_stages=2 if wide else 3)
        config["num_warps"] = 8 if block_m >= 64 else 4
    elif dtype.itemsize == 4:  # ieee fp32 dots run on FMA units and need many registers
        config.update(BLOCK_M=min(32, rows), BLOCK_N=16 if wide else 32, num_warps=8, num_stages=2)
    else:
        config.update(BLOCK_M=min(16 if wide else 32, rows), BLOCK_N=16, num_stages=1)
    return config


def decode_config(
    batch: int, h: int, h_kv: int, d_qk: int, d_v: int, capacity: int, dtype: torch.dtype, device
) -> dict:
    """Default decode launch parameters (also reported by the benchmark)."""
    device = torch.device(device)
    block_p, block_dv = _block(d_qk // 2), _block(d_v)
    # 32 keys x 4 warps: no register spills on sm_90 for fp16/bf16 at d_qk = d_v = 128 or 256,
    # in both the dot and the multiply-sum variant
    wide = 2 * block_p + block_dv > 384
    unsplit = _on_gpu(device) and choose_num_splits(batch, h_kv, capacity, 64, _num_sms(device)) == 1
    if not _on_gpu(device):
        block_n, num_stages = 16, 1
    elif dtype.itemsize <= 2 and h == h_kv and 2 * block_p + block_dv <= 128 and unsplit:
        # narrow heads without GQA (a 30% model's 48/40 layers), enough (sequence, head) programs to fill the
        # GPU without splitting the cache: 64 keys a tile keep each tile at the 8K elements of the 128/128
        # default; H200 sweep, batch 256, cache 512: 0.317 -> 0.291 ms (bench/results/gpu_h200_s18/
        # triton_kernels.json; 112/112, 128/120, 128/128 stay best at 32). Not measured where the cache is
        # split (small batches), where 64-key tiles would halve the splits: those keep 32.
        block_n, num_stages = 64, 2
    elif dtype.itemsize <= 2 or (dtype.itemsize == 4 and not wide):
        block_n, num_stages = 32, 2
    else:
        block_n, num_stages = 16, 1
    return {
        "BLOCK_N": block_n,
        "BLOCK_P": block_p,
        "BLOCK_DV": block_dv,
        "USE_DOT": h // h_kv > 1,
        "num_stages": num_stages,
        "num_warps": 4,
        "num_splits": choose_num_splits(batch, h_kv, capacity, block_n, _num_sms(device)),
    }


def decode_attention(
    q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale, out=None,
    num_splits=None, block_n=None, use_dot=None, num_warps=None, num_stages=None,
):  # fmt: skip
    """Flash-decoding for one new token per sequence: q [B, 1, H, d_qk] -> out [B, 1, H, d_v].

    The caches must already hold the new token's key/value (see `rope_append`); sequences
    with new_lens[b] == 0 get zeros.
    """
    _check_runnable(q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens)
    h_kv, d_v = k_cache.shape[1], v_cache.shape[-1]
    batch, t, h, d_qk = _check_query(q, d_v, h_kv)
    if t != 1:
        raise ValueError(f"decode_attention takes one new token per sequence, got T={t}")
    half, group = d_qk // 2, h // h_kv
    capacity = _check_caches(k_cache, v_cache, batch, h_kv, d_qk, d_v)
    _check_rope_tables(cos, sin, freq_idx, h_kv, half)
    _check_lens(cache_lens, new_lens, batch, t, capacity)
    out = _output(out, q, d_v)
    if out.numel() == 0:
        return out
    cos, sin, freq_idx = cos.contiguous(), sin.contiguous(), freq_idx.contiguous()

    config = decode_config(batch, h, h_kv, d_qk, d_v, capacity, q.dtype, q.device)
    block_p, block_dv = config["BLOCK_P"], config["BLOCK_DV"]
    block_n = config["BLOCK_N"] if block_n is None else block_n
    num_warps = config["num_warps"] if num_warps is None else num_warps
    num_stages = config["num_stages"] if num_stages is None else num_stages
    if num_splits is None:
        num_splits = choose_num_splits(batch, h_kv, capacity, block_n, _num_sms(q.device))
    use_dot = config["USE_DOT"] if use_dot is None else bool(use_dot)
    block_g = triton.next_power_of_2(group)
    if use_dot:
        block_g = max(16, block_g)  # tl.dot row dimension (older triton needs M >= 16)

    compute = _compute_dtype(q.dtype)
    part_dtype = torch.float64 if compute == tl.float64 else torch.float32
    if num_splits > 1:
        part_m = torch.empty(batch * h, num_splits, device=q.device, dtype=part_dtype)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch * h, num_splits, d_v, device=q.device, dtype=part_dtype)
    else:
        part_m = part_l = part_acc = out  # unused
    _decode_split_kernel[(batch * h_kv, num_splits)](
        q, k_cache, v_cache, out, part_m, part_l, part_acc, cos, sin, freq_idx, cache_lens, new_lens,
        float(scale), h_kv, half, d_v, cos.shape[0], cos.shape[1],
        q.stride(0), q.stride(2), q.stride(3), *k_cache.stride(), *v_cache.stride(),
        out.stride(0), out.stride(2), out.stride(3),
        GROUP=group, NUM_SPLITS=num_splits, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_P=block_p,
        BLOCK_DV=block_dv, USE_DOT=bool(use_dot), COMPUTE=compute, num_warps=num_warps, num_stages=num_stages,
        VEC=vector_width(half, d_v, q.stride(0), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3],
                         out.stride(0), out.stride(2)),
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(batch * h,)](
            part_m, part_l, part_acc, out, h, d_v, out.stride(0), out.stride(2), out.stride(3),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_DV=_block(d_v, 1),
            num_warps=1 if block_dv <= 64 else 2,
        )  # fmt: skip
    return out


def _output(out, q, d_v: int):
    batch, t, h, _ = q.shape
    if out is None:
        return torch.empty(batch, t, h, d_v, device=q.device, dtype=q.dtype)
    if tuple(out.shape) != (batch, t, h, d_v) or out.device != q.device:
        raise ValueError(f"out must be [B, T, H, d_v] = {(batch, t, h, d_v)} on {q.device}, got {tuple(out.shape)}")
    return out


def attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale):
    """Same signature and semantics as `reference.attention`: RoPE, cache append, causal GQA.

    Updates k_cache / v_cache in place and returns out [B, T, H, d_v] in q's dtype.
    """
    _check_runnable(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens)
    h_kv = k.shape[2] if k.dim() == 4 else -1
    batch, t, h, d_qk = _check_query(q, v.shape[-1], h_kv)
    if tuple(k.shape) != (batch, t, h_kv, d_qk) or v.dim() != 4 or tuple(v.shape[:3]) != (batch, t, h_kv):
        shapes = f"{tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"k must be [B, T, H_kv, d_qk] and v [B, T, H_kv, d_v], got {shapes}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    rope_append(k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens)
    if t == 1:
        return decode_attention(q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
    return prefill_attention(q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
