"""GPU microbenchmark of the Triton attention kernels (needs a CUDA device).

    python -m modegpt_rt.bench.triton_kernels --json bench/results/triton_kernels.json

Measures, with CUDA events (warmup, then the median of several runs):

- decode (T = 1) attention at batch 256, cache 512, fp16: LLaMA-2-7B heads
  (H = H_kv = 32, d_qk = d_v = 128), a compressed layer (d_qk = 88, d_v = 90), the same layer
  padded as `Model.align_widths` does on a GPU (96, 96) and a GQA layout (H_kv = 8).
  Reported as achieved HBM bandwidth = bytes of K and V read / time, for the decode kernels
  alone and for the whole op (RoPE + cache append + decode), next to the torch reference
  (RoPE gathered outside any kernel) on the same inputs;
- prefill TFLOP/s (useful causal FLOPs: 2 * (d_qk + d_v) per visible query/key pair) at
  batch 8 x prompt 256 and batch 4 x prompt 1024, empty cache;
- the machine's own ceilings for comparison: device copy bandwidth (torch copy of a large
  tensor, read + write bytes) and fp16 matmul TFLOP/s.

Writes JSON with the device, torch/triton/CUDA versions and the command line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys


def _modules():
    import torch

    try:
        from modegpt_rt.kernels import reference, triton_attention
    except ImportError:  # run from a source checkout: python -m bench.triton_kernels
        from kernels import reference, triton_attention
    return torch, reference, triton_attention


def cuda_time_ms(fn, warmup: int, iters: int) -> dict:
    """Median / min / max milliseconds of fn() over `iters` runs, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in events]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": iters}


def make_inputs(torch, *, B, T, H, H_kv, d_qk, d_v, S, cache_len, head_dim=128, dtype, seed=0, device="cuda"):
    """Random inputs with `cache_len` tokens already cached and T new ones per sequence."""
    g = torch.Generator(device=device).manual_seed(seed)
    half, full_half = d_qk // 2, head_dim // 2
    inv_freq = 10000.0 ** (-torch.arange(full_half, dtype=torch.float64, device=device) / full_half)
    angles = torch.arange(S, dtype=torch.float64, device=device)[:, None] * inv_freq
    cos, sin = angles.cos().float(), angles.sin().float()
    perm = torch.stack([torch.randperm(full_half, generator=g, device=device) for _ in range(H_kv)])
    freq_idx = perm[:, :half].sort(dim=1).values.to(torch.int32)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    return dict(
        q=rand(B, T, H, d_qk),
        k=rand(B, T, H_kv, d_qk),
        v=rand(B, T, H_kv, d_v),
        k_cache=rand(B, H_kv, S, d_qk),
        v_cache=rand(B, H_kv, S, d_v),
        cos=cos,
        sin=sin,
        freq_idx=freq_idx,
        cache_lens=torch.full((B,), cache_len, dtype=torch.int32, device=device),
        new_lens=torch.full((B,), T, dtype=torch.int32, device=device),
        scale=1.0 / math.sqrt(head_dim),
    )


ARG_ORDER = ("q", "k", "v", "k_cache", "v_cache", "cos", "sin", "freq_idx", "cache_lens", "new_lens", "scale")


def _max_err(torch, reference, triton_attention, x) -> float:
    args = [x[name].clone() if torch.is_tensor(x[name]) else x[name] for name in ARG_ORDER]
    ref = reference.attention(*args)
    args = [x[name].clone() if torch.is_tensor(x[name]) else x[name] for name in ARG_ORDER]
    out = triton_attention.attention(*args)
    return float((out.float() - ref.float()).abs().max())


def _decode_setup(torch, triton_attention, shape: dict, dtype, device="cuda", seed=0):
    """Inputs of one decode step with S - 1 tokens cached, the new token appended once (the same slot every
    later call); returns (inputs, the full op's args, decode_attention's args, bytes of K and V it reads)."""
    B, H, H_kv, d_qk, d_v, S = (shape[k] for k in ("B", "H", "H_kv", "d_qk", "d_v", "S"))
    x = make_inputs(
        torch, B=B, T=1, H=H, H_kv=H_kv, d_qk=d_qk, d_v=d_v, S=S, cache_len=S - 1, dtype=dtype, device=device,
        seed=seed,
    )  # fmt: skip
    args = [x[name] for name in ARG_ORDER]
    kv_bytes = B * H_kv * S * (d_qk + d_v) * x["k_cache"].element_size()  # S - 1 cached tokens + the new one
    decode_args = [x[k] for k in ("q", "k_cache", "v_cache", "cos", "sin", "freq_idx", "cache_lens", "new_lens")]
    decode_args.append(x["scale"])
    triton_attention.attention(*args)
    return x, args, decode_args, kv_bytes


def bench_decode(torch, reference, triton_attention, shape: dict, warmup: int, iters: int, time_ref: bool) -> dict:
    B, H, H_kv, d_qk, d_v, S = (shape[k] for k in ("B", "H", "H_kv", "d_qk", "d_v", "S"))
    x, args, decode_args, kv_bytes = _decode_setup(torch, triton_attention, shape, torch.float16)
    res = dict(shape)
    res["kv_bytes"] = kv_bytes
    res["launch"] = triton_attention.decode_config(B, H, H_kv, d_qk, d_v, S, torch.float16, "cuda")
    res["max_abs_err_vs_reference"] = _max_err(torch, reference, triton_attention, x)
    timed = {
        "decode_kernels": lambda: triton_attention.decode_attention(*decode_args),
        "attention_op": lambda: triton_attention.attention(*args),
    }
    if time_ref:
        timed["torch_reference"] = lambda: reference.attention(*args)
    for name, fn in timed.items():
        t = cuda_time_ms(fn, warmup, iters)
        t["kv_bandwidth_GBps"] = kv_bytes / (t["median_ms"] * 1e-3) / 1e9
        res[name] = t
    return res


# launch configurations `--sweep` tries for a decode shape (the default comes from decode_config)
SWEEP_GRID = {"BLOCK_N": (16, 32, 64), "num_warps": (4, 8), "num_stages": (1, 2, 3)}


def sweep_decode(torch, reference, triton_attention, shape, time_fn, grid=SWEEP_GRID, dtype=None, device="cuda"):
    """Every decode launch configuration in `grid` for one shape, each checked against the torch reference on
    the same inputs and timed by time_fn(fn) -> {"median_ms": ...}. A configuration that fails to compile or
    launch (e.g. out of shared memory) is recorded with its error, not raised. Rows come back fastest first."""
    import itertools

    _, args, decode_args, kv_bytes = _decode_setup(
        torch, triton_attention, shape, dtype or torch.float16, device, seed=1
    )
    # the op on the cache that already holds the new token rewrites the same slot: the same output
    ref = reference.attention(*[a.clone() if torch.is_tensor(a) else a for a in args]).float()
    rows = []
    for block_n, warps, stages in itertools.product(grid["BLOCK_N"], grid["num_warps"], grid["num_stages"]):
        row = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        kw = dict(block_n=block_n, num_warps=warps, num_stages=stages)

        def run(kw=kw):
            return triton_attention.decode_attention(*decode_args, **kw)

        try:
            row["max_abs_err_vs_reference"] = float((run().float() - ref).abs().max())
            row.update(time_fn(run))
        except Exception as e:  # noqa: BLE001 - a configuration the compiler or the GPU refuses
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        else:
            row["kv_bandwidth_GBps"] = kv_bytes / (row["median_ms"] * 1e-3) / 1e9
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("median_ms", math.inf))


def bench_prefill(torch, reference, triton_attention, shape: dict, warmup: int, iters: int, time_ref: bool) -> dict:
    B, T, H, H_kv, d_qk, d_v = (shape[k] for k in ("B", "T", "H", "H_kv", "d_qk", "d_v"))
    x = make_inputs(torch, B=B, T=T, H=H, H_kv=H_kv, d_qk=d_qk, d_v=d_v, S=T, cache_len=0, dtype=torch.float16)
    args = [x[name] for name in ARG_ORDER]
    flops = B * H * (T * (T + 1) // 2) * 2 * (d_qk + d_v)  # QK^T and PV over the causal triangle
    prefill_args = (x["q"], x["k_cache"], x["v_cache"], x["cos"], x["sin"], x["freq_idx"], x["cache_lens"])
    prefill_args += (x["new_lens"], x["scale"])
    triton_attention.attention(*args)
    res = dict(shape)
    res["useful_flops"] = flops
    res["launch"] = triton_attention.prefill_config(T, H, H_kv, d_qk, d_v, torch.float16, "cuda")
    res["max_abs_err_vs_reference"] = _max_err(torch, reference, triton_attention, x)
    timed = {
        "prefill_kernel": lambda: triton_attention.prefill_attention(*prefill_args),
        "attention_op": lambda: triton_attention.attention(*args),
    }
    if time_ref:
        timed["torch_reference"] = lambda: reference.attention(*args)
    for name, fn in timed.items():
        t = cuda_time_ms(fn, warmup, iters)
        t["TFLOPs"] = flops / (t["median_ms"] * 1e-3) / 1e12
        res[name] = t
    return res


def bench_machine(torch, warmup: int, iters: int) -> dict:
    n = 1 << 29  # 1 GiB of fp16
    src = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy = cuda_time_ms(lambda: dst.copy_(src), warmup, iters)
    copy["bytes"] = 2 * src.numel() * src.element_size()  # read + write
    copy["GBps"] = copy["bytes"] / (copy["median_ms"] * 1e-3) / 1e9
    src = dst = None  # free the 2 GiB before the matmul
    m = 8192
    a = torch.randn(m, m, dtype=torch.float16, device="cuda")
    b = torch.randn(m, m, dtype=torch.float16, device="cuda")
    mm = cuda_time_ms(lambda: a @ b, warmup, iters)
    mm["shape"] = [m, m, m]
    mm["TFLOPs"] = 2 * m**3 / (mm["median_ms"] * 1e-3) / 1e12
    return {"device_copy": copy, "fp16_matmul": mm}


DECODE_SHAPES = {
    "llama2_7b": dict(B=256, H=32, H_kv=32, d_qk=128, d_v=128, S=512),
    "compressed_88_90": dict(B=256, H=32, H_kv=32, d_qk=88, d_v=90, S=512),
    # the same layer as Model.align_widths pads it on a GPU (pairs to a multiple of 8, values to 8)
    "compressed_aligned_96_96": dict(B=256, H=32, H_kv=32, d_qk=96, d_v=96, S=512),
    "gqa8_128": dict(B=256, H=32, H_kv=8, d_qk=128, d_v=128, S=512),
    # the commonest padded layers of the paper's 30% ranks (7, 6 and 4 of 32 layers; gpu_throughput paper30)
    "paper30_112_112": dict(B=256, H=32, H_kv=32, d_qk=112, d_v=112, S=512),
    "paper30_128_120": dict(B=256, H=32, H_kv=32, d_qk=128, d_v=120, S=512),
    "paper30_48_40": dict(B=256, H=32, H_kv=32, d_qk=48, d_v=40, S=512),
}
PREFILL_SHAPES = {
    "llama2_7b_b8_t256": dict(B=8, T=256, H=32, H_kv=32, d_qk=128, d_v=128),
    "compressed_88_90_b8_t256": dict(B=8, T=256, H=32, H_kv=32, d_qk=88, d_v=90),
    "compressed_aligned_96_96_b8_t256": dict(B=8, T=256, H=32, H_kv=32, d_qk=96, d_v=96),
    "llama2_7b_b4_t1024": dict(B=4, T=1024, H=32, H_kv=32, d_qk=128, d_v=128),
}


def _ref_ms(res: dict) -> str:
    if "torch_reference" not in res:
        return ""
    return f"torch reference {res['torch_reference']['median_ms']:.3f} ms, "


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modegpt_rt.bench.triton_kernels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the torch reference")
    parser.add_argument(
        "--sweep",
        metavar="SHAPES",
        help="also time every decode launch configuration of SWEEP_GRID for these decode shapes "
        f"(comma-separated, or 'all'; shapes: {', '.join(DECODE_SHAPES)})",
    )
    args = parser.parse_args(argv)
    sweep = list(DECODE_SHAPES) if args.sweep == "all" else (args.sweep.split(",") if args.sweep else [])
    unknown = [n for n in sweep if n not in DECODE_SHAPES]
    if unknown:
        parser.error(f"unknown decode shape(s) for --sweep: {', '.join(unknown)}")

    torch, reference, triton_attention = _modules()
    if not torch.cuda.is_available():
        print("bench.triton_kernels needs a CUDA device and none is available; nothing measured.", file=sys.stderr)
        return 2
    if not triton_attention.available():
        print(f"triton is not usable here: {triton_attention._IMPORT_ERROR}", file=sys.stderr)
        return 2
    import triton

    time_ref = not args.skip_reference
    props = torch.cuda.get_device_properties(0)
    report = {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([sys.executable, "-m", "modegpt_rt.bench.triton_kernels", *sys.argv[1:]]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": f"CUDA events, {args.warmup} warmup runs, median of {args.iters}",
    }

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    report["machine"] = bench_machine(torch, args.warmup, args.iters)
    copy_bw = report["machine"]["device_copy"]["GBps"]
    mm_tflops = report["machine"]["fp16_matmul"]["TFLOPs"]
    print(f"{report['device']}: copy {copy_bw:.0f} GB/s, fp16 matmul {mm_tflops:.0f} TFLOP/s")

    def run_shapes(shapes, bench, kernel, rate, ceiling, fraction, line):
        """bench(shape) for every shape; the kernel's and the whole op's `rate` as a `fraction` of `ceiling`."""
        out = {}
        for name, shape in shapes.items():
            res = bench(torch, reference, triton_attention, shape, args.warmup, args.iters, time_ref)
            for key in (kernel, "attention_op"):
                res[key][fraction] = res[key][rate] / ceiling
            out[name] = res
            print(
                f"{name}: {line(res[kernel])}, op {res['attention_op']['median_ms']:.3f} ms, "
                f"{_ref_ms(res)}max err {res['max_abs_err_vs_reference']:.1e}"
            )
            torch.cuda.empty_cache()
        return out

    report["decode"] = run_shapes(
        DECODE_SHAPES, bench_decode, "decode_kernels", "kv_bandwidth_GBps", copy_bw, "fraction_of_copy_bw",
        lambda k: f"decode kernels {k['median_ms']:.3f} ms ({k['kv_bandwidth_GBps']:.0f} GB/s, "
        f"{100 * k['fraction_of_copy_bw']:.0f}% of copy)",
    )  # fmt: skip
    save()
    report["prefill"] = run_shapes(
        PREFILL_SHAPES, bench_prefill, "prefill_kernel", "TFLOPs", mm_tflops, "fraction_of_matmul",
        lambda k: f"prefill kernel {k['median_ms']:.3f} ms ({k['TFLOPs']:.1f} TFLOP/s)",
    )  # fmt: skip

    if sweep:
        report["decode_sweep"] = {}
        for name in sweep:
            rows = sweep_decode(
                torch, reference, triton_attention, DECODE_SHAPES[name],
                lambda fn: cuda_time_ms(fn, args.warmup, args.iters),
            )  # fmt: skip
            report["decode_sweep"][name] = rows
            default = report["decode"][name]["launch"]
            ms = report["decode"][name]["decode_kernels"]["median_ms"]
            for r in rows[:3]:
                if "median_ms" in r:
                    print(
                        f"sweep {name}: BLOCK_N {r['BLOCK_N']} warps {r['num_warps']} stages {r['num_stages']}: "
                        f"{r['median_ms']:.3f} ms ({100 * r['kv_bandwidth_GBps'] / copy_bw:.0f}% of copy), "
                        f"max err {r['max_abs_err_vs_reference']:.1e}"
                    )
            print(
                f"sweep {name}: default BLOCK_N {default['BLOCK_N']} warps {default['num_warps']} "
                f"stages {default['num_stages']} {ms:.3f} ms; {sum('error' in r for r in rows)} of {len(rows)} failed"
            )
            torch.cuda.empty_cache()
            save()  # a sweep cut short by a time limit keeps the shapes it finished

    save()
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
