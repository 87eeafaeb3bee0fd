"""Plain-torch reference of the attention op (see kernels/__init__.py for shapes).

Every fast path is tested against this function in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_rope(cos, sin, freq_idx, positions):
    """cos/sin rows at `positions` [B, T] for each group's kept frequencies -> [B, T, H_kv, d_qk/2]."""
    return cos[positions][..., freq_idx], sin[positions][..., freq_idx]


def apply_rope(x, c, s):
    """Rotate x [..., d_qk] laid out as [first halves | second halves] of the kept pairs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale):
    B, T, H, d_qk = q.shape
    H_kv = k.shape[2]
    G = H // H_kv
    steps = torch.arange(T, device=q.device)
    positions = cache_lens.long()[:, None] + steps  # [B, T]
    n_new = new_lens.long().clamp(max=T)  # new_lens > T counts as T (as the C++ and Triton kernels read it)
    valid = steps[None, :] < n_new[:, None]  # [B, T]
    c, s = gather_rope(cos, sin, freq_idx.long(), positions.clamp(max=cos.shape[0] - 1))
    c, s = c.to(q.dtype), s.to(q.dtype)
    q_rot = apply_rope(q.view(B, T, H_kv, G, d_qk), c[:, :, :, None], s[:, :, :, None]).view(B, T, H, d_qk)
    k_rot = apply_rope(k, c, s)

    b_idx, t_idx = valid.nonzero(as_tuple=True)
    p_idx = positions[b_idx, t_idx]
    k_cache[b_idx, :, p_idx] = k_rot[b_idx, t_idx].to(k_cache.dtype)
    v_cache[b_idx, :, p_idx] = v[b_idx, t_idx].to(v_cache.dtype)

    if B == 0:
        return q.new_zeros(0, T, H, v.shape[-1])
    L = int((cache_lens.long() + n_new).max())
    keys = k_cache[:, :, :L].to(q.dtype)
    values = v_cache[:, :, :L].to(q.dtype)
    mask = torch.arange(L, device=q.device)[None, None, :] <= positions[:, :, None]  # [B, T, L]
    out = F.scaled_dot_product_attention(
        q_rot.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=G > 1
    )  # [B, H, T, d_v]
    out = out.transpose(1, 2)
    return out * valid[:, :, None, None].to(out.dtype)
