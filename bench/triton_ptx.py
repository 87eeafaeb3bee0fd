"""Compile the Triton attention kernels ahead of time for an NVIDIA target (no GPU needed) and count the
global memory loads of the PTX by width, per head layout.

    python -m modegpt_rt.bench.triton_ptx [--layouts 128/128,88/90,80/104] [--arch 90] [--glue] [--json OUT]

A layout is d_qk/d_v (fp16, 32 heads, MHA). Rows of 8-aligned widths should compile to 16-byte vector
loads (`ld.global.v4.b32`, or asynchronous copies in the prefill's pipelined loop) and unaligned ones to
2-byte loads (`ld.global.b16`): the difference between 98% and 45% of copy bandwidth measured on an H200
(bench/results/triton_kernels_h200.json). Registers and spills per thread come from the `ptxas` that
Triton ships. Run it with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import torch


class _Capture:
    """Stands in for a kernel object: records the launch arguments instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log[self.fn.__name__] = (self.fn, args, kwargs)

        return launch


def load_widths(ptx: str) -> dict[str, int]:
    """{instruction: count} of the global loads in a PTX listing (ld.global.b16, ld.global.v4.b32, ...)."""
    found = re.findall(r"\b(ld\.global(?:\.[a-z0-9]+)*|cp\.async(?:\.[a-z0-9]+)*)", ptx)
    return dict(sorted(collections.Counter(found).items()))


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread from `ptxas -v` (the assemblers Triton ships; {} if none takes it)."""
    import glob
    import subprocess
    import tempfile

    import triton

    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*"))):
            cmd = [ptxas, "-v", "--gpu-name", f"sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", r.stderr)
            if r.returncode == 0 and regs:
                spills = re.search(r"(\d+) bytes spill stores", r.stderr)
                return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)) if spills else 0}
    return {}


def compile_layout(d_qk: int, d_v: int, arch: int = 90) -> dict:
    """AOT-compile rope_append, prefill and decode for one layout; their PTX load widths and VEC."""
    from modegpt_rt.kernels import triton_attention as ta
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if type(ta._prefill_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were built for the interpreter: run with TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    log: dict = {}
    saved = {name: getattr(ta, name) for name in ("_rope_append_kernel", "_prefill_kernel", "_decode_split_kernel")}
    patched = dict(_on_gpu=ta._on_gpu, _num_sms=ta._num_sms, _check_runnable=ta._check_runnable)
    try:
        for name, fn in saved.items():
            setattr(ta, name, _Capture(fn, log))
        ta._on_gpu = lambda device: True  # the GPU launch configurations
        ta._num_sms = lambda device: 132
        ta._check_runnable = lambda *tensors: None  # CPU tensors stand in for device ones
        f16, H, S = torch.float16, 32, 512
        cos = sin = torch.zeros(S, 64)
        fidx = torch.arange(d_qk // 2, dtype=torch.int32).repeat(H, 1)
        for B, T in ((256, 1), (8, 256)):
            q = torch.zeros(B, T, H, d_qk, dtype=f16)
            kc, vc = torch.zeros(B, H, S, d_qk, dtype=f16), torch.zeros(B, H, S, d_v, dtype=f16)
            lens, new = torch.full((B,), S - T, dtype=torch.int32), torch.full((B,), T, dtype=torch.int32)
            out = torch.zeros(B, T, H, d_v, dtype=f16)
            launcher = ta.decode_attention if T == 1 else ta.prefill_attention
            launcher(q, kc, vc, cos, sin, fidx, lens, new, 0.1, out=out)
            if T > 1:
                ta.rope_append(q[:, :, :H], torch.zeros(B, T, H, d_v, dtype=f16), kc, vc, cos, sin, fidx, lens, new)
    finally:
        for name, value in {**saved, **patched}.items():
            setattr(ta, name, value)
    result = {"d_qk": d_qk, "d_v": d_v, "arch": arch}
    for name, (fn, args, kwargs) in sorted(log.items()):
        ptx = _ptx(fn, args, kwargs, backend, target)
        result[name.strip("_")] = {"VEC": kwargs.get("VEC", 1), "loads": load_widths(ptx), **ptxas_report(ptx, arch)}
    return result


def _ptx(fn, args, kwargs, backend, target) -> str:
    """PTX of one captured launch of a @triton.jit kernel, compiled for `target`."""
    from triton.compiler import ASTSource, compile
    from triton.runtime.jit import create_function_from_signature

    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__).asm["ptx"]


def compile_glue(arch: int = 90, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)) -> list[dict]:
    """AOT-compile the fused add + RMSNorm and SiLU·up kernels (`triton_fused`) at LLaMA-2-7B widths (4096
    hidden, 11008 MLP channels), batch 1, per dtype; their PTX load widths, registers and spills."""
    from modegpt_rt.kernels import triton_fused as tf
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if type(tf._silu_mul_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were built for the interpreter: run with TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    results = []
    saved = {name: getattr(tf, name) for name in ("_add_rms_norm_kernel", "_silu_mul_kernel", "_check_runnable")}
    try:
        for dtype in dtypes:
            log: dict = {}
            for name in ("_add_rms_norm_kernel", "_silu_mul_kernel"):
                setattr(tf, name, _Capture(saved[name], log))
            tf._check_runnable = lambda *tensors: None
            h = torch.zeros(1, 4096, dtype=dtype)
            tf.add_rms_norm(h, torch.zeros_like(h), torch.ones(4096, dtype=dtype), 1e-5)
            tf.silu_mul(torch.zeros(1, 2 * 11008, dtype=dtype))
            for name, (fn, args, kwargs) in sorted(log.items()):
                ptx = _ptx(fn, args, kwargs, backend, target)
                kind = str(dtype).replace("torch.", "")
                results.append(
                    {"kernel": name.strip("_"), "dtype": kind, "loads": load_widths(ptx), **ptxas_report(ptx, arch)}
                )
    finally:
        for name, value in saved.items():
            setattr(tf, name, value)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modegpt_rt.bench.triton_ptx", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="128/128,88/90,96/96,80/104", help="d_qk/d_v,... (fp16, 32 heads)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--glue", action="store_true", help="also compile the fused add + RMSNorm and SiLU·up kernels")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_ptx: unset TRITON_INTERPRET (it compiles for the GPU)")
    results = []
    for layout in args.layouts.split(","):
        d_qk, d_v = (int(x) for x in layout.split("/"))
        res = compile_layout(d_qk, d_v, args.arch)
        results.append(res)
        for kernel in ("rope_append_kernel", "prefill_kernel", "decode_split_kernel"):
            r = res[kernel]
            regs = f"  {r['registers']} registers, {r['spill_store_bytes']} B spilled" if "registers" in r else ""
            print(f"{d_qk:>4}/{d_v:<4} {kernel:<20} VEC {r['VEC']}{regs}  {r['loads']}", flush=True)
    glue = compile_glue(args.arch) if args.glue else []
    for r in glue:
        regs = f"  {r['registers']} registers, {r['spill_store_bytes']} B spilled" if "registers" in r else ""
        print(f"glue {r['dtype']:<9} {r['kernel']:<20}{regs}  {r['loads']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            doc = {"arch": args.arch, "command": " ".join(sys.argv), "results": results, "glue": glue}
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
