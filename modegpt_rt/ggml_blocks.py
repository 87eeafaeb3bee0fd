"""GGUF tensor bytes to float32 with whole-tensor torch operations.

The `gguf` package dequantizes a tensor 16 rows at a time and allocates per group, which costs most on short
rows (SmolLM2's 576 values: about 1.2 s of a 2.6 s load). The functions here do the same arithmetic
in the same order on the whole tensor at once (each scale product rounded to float32 where the package rounds
it, then q times the scale, then minus the minimum), so the results are the package's bit for bit
(`tests/test_gguf.py` checks every type against it, awkward scales included). Types not listed here go to the
package.

Block layouts (ggml): Q4_0 = half d, 16 bytes of nibbles; Q4_1 = half d, half m, 16 bytes; Q8_0 = half d,
32 int8; the K-quants hold 256 values in 8 sub-blocks of 32 (Q4_K, Q5_K: half d, half dmin, 12 bytes of 6-bit
scales and minimums, [32 bytes of fifth bits,] 128 bytes of nibbles) or 16 of 16 (Q6_K: 128 bytes of low
nibbles, 64 of high bit pairs, 16 int8 scales, half d); BF16 is the top half of a float32.
"""

from __future__ import annotations

import torch

# bytes per block of each type read here (values per block: 32, 256 for the K-quants, 1 for BF16)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "BF16": 2}
# byte offsets of the float16 scales in each block (the K-quants' d and dmin; Q6_K's d comes last)
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "BF16": []}


def _half(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block, as float32 [blocks, 1]."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[blocks, n, w] bytes -> [blocks, 2n, w] float32: each group's low nibbles, then its high ones."""
    out = torch.empty(qs.shape[0], qs.shape[1], 2, qs.shape[2], dtype=torch.float32)
    out[:, :, 0] = qs & 15
    out[:, :, 1] = qs >> 4
    return out.view(qs.shape[0], 2 * qs.shape[1], qs.shape[2])


def _k_scales(raw: torch.Tensor):
    """Q4_K / Q5_K: the 8 sub-blocks' scale and minimum products d·sc, dmin·m as float32 [blocks, 8, 1]."""
    s = raw[:, 4:16].reshape(-1, 3, 4)
    lo, mid, top = s[:, 0], s[:, 1], s[:, 2]  # 6-bit scales in lo, minimums in mid, their top bits in top
    sc = torch.cat([lo & 63, (top & 15) | ((lo >> 2) & 48)], dim=1)
    mn = torch.cat([mid & 63, (top >> 4) | ((mid >> 2) & 48)], dim=1)
    return (_half(raw, 0) * sc.float()).unsqueeze(-1), (_half(raw, 2) * mn.float()).unsqueeze(-1)


def dequantize(data, kind: str) -> torch.Tensor:
    """float32 values of a GGUF tensor's bytes `data` (a uint8 numpy array, e.g. a read-only map: only read)
    of type `kind` (a key of BLOCK_BYTES), flattened to [blocks, values per block]."""
    raw = torch.from_numpy(data.view("uint8").reshape(-1, BLOCK_BYTES[kind]))  # bytes, whatever the view said
    if kind == "BF16":
        return raw.view(torch.bfloat16).float()
    if kind == "Q8_0":
        return raw[:, 2:].contiguous().view(torch.int8).float().mul_(_half(raw, 0))
    if kind in ("Q4_0", "Q4_1"):
        head = 2 if kind == "Q4_0" else 4
        q = _nibbles(raw[:, None, head:]).view(raw.shape[0], 32)  # element j: byte j's low nibble, j + 16: its high
        if kind == "Q4_0":
            return q.sub_(8).mul_(_half(raw, 0))
        return q.mul_(_half(raw, 0)).add_(_half(raw, 2))
    if kind == "Q4_K":
        ds, dm = _k_scales(raw)
        return _nibbles(raw[:, 16:].reshape(-1, 4, 32)).mul_(ds).sub_(dm).view(-1, 256)
    if kind == "Q5_K":
        ds, dm = _k_scales(raw)
        bits = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        high = (raw[:, None, 16:48] >> bits) & 1  # sub-block s takes bit s of the 32 fifth-bit bytes
        return _nibbles(raw[:, 48:].reshape(-1, 4, 32)).add_(high * 16).mul_(ds).sub_(dm).view(-1, 256)
    if kind == "Q6_K":
        low = _nibbles(raw[:, :128].reshape(-1, 2, 64)).view(-1, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        high = ((raw[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).view(-1, 8, 32)
        q = low.add_(high * 16).sub_(32).view(-1, 16, 16)
        scales = _half(raw, 208) * raw[:, 192:208].contiguous().view(torch.int8).float()
        return q.mul_(scales.unsqueeze(-1)).view(-1, 256)
    raise KeyError(kind)
