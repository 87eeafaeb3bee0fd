"""GGUF tensor bytes to float32 with torch operations over large chunks of a tensor.

The `gguf` package dequantizes a tensor 16 rows at a time and allocates per group, which costs most on short
rows (SmolLM2's 576 values: about 1.2 s of a 2.6 s load). The functions here do the same arithmetic in the
same order on up to 196,608 values at a time (each scale product rounded to float32 where the package rounds
it, then q times the scale, then minus the minimum), so every value that is not NaN has the package's bits and
the NaNs fall in the same places (`tests/test_gguf.py` checks every type against it, awkward scales
included). Types not listed here go to the package.

Block layouts (ggml): Q4_0 = half d, 16 bytes of nibbles; Q4_1 = half d, half m, 16 bytes; Q8_0 = half d,
32 int8; the K-quants hold 256 values in 8 sub-blocks of 32 (Q4_K, Q5_K: half d, half dmin, 12 bytes of 6-bit
scales and minimums, [32 bytes of fifth bits,] 128 bytes of nibbles) or 16 of 16 (Q6_K: 128 bytes of low
nibbles, 64 of high bit pairs, 16 int8 scales, half d); BF16 is the top half of a float32.
"""

from __future__ import annotations

import torch

# bytes and values per block of each type read here
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "BF16": 2}
BLOCK_VALUES = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "BF16": 1}
# byte offsets of the float16 scales in each block (the K-quants' d and dmin; Q6_K's d comes last)
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "BF16": []}


def _half(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block, as float32 [blocks, 1]."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).float()


# Values dequantized at a time, so that every temporary (a byte per value for the K-quants' high bits, half
# a byte for Q4_0/Q4_1's nibbles, 6 bytes per block for the scales; BF16 makes none) stays below glibc's
# initial mmap threshold of 128 KB while each op still spans several of torch's parallel grains. A freed
# mmapped block raises that threshold to its size (up to 32 MB); allocations that big then come from the
# heap, which fragments: with whole-tensor temporaries (28 MB for SmolLM2's embedding) a process held 1.68 GiB
# after `modegpt_rt.load()`, against 1.00 GiB chunked and 1.43 GiB with the `gguf` package.
CHUNK_VALUES = {"Q4_0": 3 << 16, "Q4_1": 3 << 16, "Q8_0": 3 << 16, "Q4_K": 3 << 15, "Q5_K": 3 << 15, "Q6_K": 3 << 15}


def _nibbles(qs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """[blocks, n, w] bytes into `out` [blocks, n, 2, w] float32: each group's low nibbles, then its high
    ones; returns `out` viewed [blocks, 2n, w]."""
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


def _into(raw: torch.Tensor, kind: str, out: torch.Tensor) -> None:
    """Dequantize the blocks `raw` [n, bytes] into `out` [n, values per block] float32, in place."""
    n = raw.shape[0]
    if kind == "BF16":
        out.copy_(raw.view(torch.bfloat16))
    elif kind == "Q8_0":
        out.copy_(raw[:, 2:].view(torch.int8)).mul_(_half(raw, 0))
    elif kind in ("Q4_0", "Q4_1"):  # element j: byte j's low nibble, element j + 16: its high one
        q = _nibbles(raw[:, None, 2 if kind == "Q4_0" else 4 :], out.view(n, 1, 2, 16)).view(n, 32)
        if kind == "Q4_0":
            q.sub_(8).mul_(_half(raw, 0))
        else:
            q.mul_(_half(raw, 0)).add_(_half(raw, 2))
    elif kind in ("Q4_K", "Q5_K"):
        ds, dm = _k_scales(raw)
        q = _nibbles(raw[:, 16 if kind == "Q4_K" else 48 :].reshape(n, 4, 32), out.view(n, 4, 2, 32))
        if kind == "Q5_K":  # sub-block s takes bit s of the 32 fifth-bit bytes
            q.add_(((raw[:, None, 16:48] >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1) * 16)
        q.mul_(ds).sub_(dm)
    elif kind == "Q6_K":
        q = _nibbles(raw[:, :128].reshape(n, 2, 64), out.view(n, 2, 2, 64)).view(n, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        q.add_(((raw[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).view(n, 8, 32) * 16).sub_(32)
        scales = _half(raw, 208) * raw[:, 192:208].contiguous().view(torch.int8).float()
        q.view(n, 16, 16).mul_(scales.unsqueeze(-1))
    else:
        raise KeyError(kind)


def dequantize(data, kind: str) -> torch.Tensor:
    """float32 values of a GGUF tensor's bytes `data` (a uint8 numpy array, e.g. a read-only map: only read)
    of type `kind` (a key of BLOCK_BYTES), flattened to [blocks, values per block]; CHUNK_VALUES at a time."""
    raw = torch.from_numpy(data.view("uint8").reshape(-1, BLOCK_BYTES[kind]))  # bytes, whatever the view said
    per_block = BLOCK_VALUES[kind]
    out = torch.empty(raw.shape[0], per_block, dtype=torch.float32)
    step = max(1, CHUNK_VALUES.get(kind, out.numel()) // per_block)
    for a in range(0, raw.shape[0], step):
        _into(raw[a : a + step], kind, out[a : a + step])
    return out
