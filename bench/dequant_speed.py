"""GGUF dequantization alone: the `gguf` package against `modegpt_rt.ggml_blocks`, type by type.

    python -m modegpt_rt.bench.dequant_speed [--shape 4096x4096] [--types Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K,BF16]
                                             [--rounds 5] [--json OUT]

One tensor of random quants with small finite scales per type (a LLaMA-2-7B projection's shape by default),
dequantized by each in alternating rounds; reports the median seconds and millions of values per second, and
checks that both give the same bits. The package runs numpy on one thread; ours runs torch on torch's threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from modegpt_rt.bench.machine import write_result

from modegpt_rt import ggml_blocks


def random_tensor(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """uint8 bytes of a [rows, cols] tensor of type `kind`: random quants, float16 scales small and finite (so
    no value is NaN or Inf)."""
    size = ggml_blocks.BLOCK_BYTES[kind]
    if kind == "BF16":
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, 2 * cols)
    per_block = ggml_blocks.BLOCK_VALUES[kind]
    if cols % per_block:
        raise SystemExit(f"{kind}: columns must be a multiple of {per_block}")
    data = rng.integers(0, 256, size=(rows, cols // per_block * size), dtype=np.uint8)
    blocks = data.reshape(-1, size)
    for at in ggml_blocks.SCALE_OFFSETS[kind]:
        blocks[:, at : at + 2] = (rng.standard_normal((len(blocks), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modegpt_rt.bench.dequant_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x4096", help="rows x columns of the tensor")
    p.add_argument("--types", default=",".join(ggml_blocks.BLOCK_BYTES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import gguf.quants

    rows, cols = (int(x) for x in args.shape.lower().split("x"))
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ggml_blocks.BLOCK_BYTES]
    if unknown:
        p.error(f"unknown types {unknown} (known: {', '.join(ggml_blocks.BLOCK_BYTES)})")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    rng = np.random.default_rng(0)
    results = []
    for kind in kinds:
        data = random_tensor(kind, rows, cols, rng)
        qtype = gguf.GGMLQuantizationType[kind]
        times = {"gguf": [], "ours": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            ref = gguf.quants.dequantize(data, qtype)
            times["gguf"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = ggml_blocks.dequantize(data, kind)
            times["ours"].append(time.perf_counter() - t0)
        same = np.array_equal(ref.reshape(-1).view(np.uint32), got.reshape(-1).numpy().view(np.uint32))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"type": kind, "shape": [rows, cols], "seconds": times, "median_s": med, "bit_identical": same}
        row["speedup"] = med["gguf"] / med["ours"]
        results.append(row)
        mvals = rows * cols / 1e6
        print(
            f"{kind:5s} gguf {med['gguf']:.3f} s ({mvals / med['gguf']:.0f} M values/s), ours {med['ours']:.3f} s "
            f"({mvals / med['ours']:.0f} M values/s): {row['speedup']:.1f}x, bit-identical {same}"
        )
    if args.json:
        threads = torch.get_num_threads()
        write_result(args.json, "dequant_speed", "dequant_speed", argv, threads=threads, results=results)
        print(f"wrote {args.json}")
    return 0 if all(r["bit_identical"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
