"""Triton attention kernels against the torch reference, run by the Triton interpreter on CPU.

Every case uses fresh random inputs (its own seed), caches whose unused slots are poisoned
with NaN (the reference gets a finite poison instead, since its masked matmul would turn
NaN into NaN outputs), NaN-filled output buffers where a launcher takes `out`, and awkward
shapes: odd rotary pair counts, d_v != d_qk, GQA ratios 1/3/8, ragged and empty
sequences, cache lengths that are not multiples of the block size, several decode splits.
Shapes are small: the interpreter runs every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton: kernels are built interpreted
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not importable; the Triton kernels cannot be tested")
import triton.language as tl  # noqa: E402
import triton.language.standard as tl_standard  # noqa: E402

# On a CUDA machine the kernels are compiled and the inputs live on the GPU; elsewhere conftest has
# set TRITON_INTERPRET=1 and everything runs in the interpreter on CPU tensors. References stay on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and type(tl.zeros).__name__ != "InterpretedFunction":
    # triton was imported before this module set TRITON_INTERPRET=1 (in a whole-suite run,
    # torch._dynamo imports it while other test modules are collected), so its own
    # @triton.jit helpers (tl.zeros, tl.sum, tl.max, ...) were built for the compiler and
    # fail inside interpreted kernels. Rebuild them for the interpreter.
    importlib.reload(tl_standard)
    importlib.reload(tl)
    if type(tl.zeros).__name__ != "InterpretedFunction":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 and could not be switched to the interpreter; "
            "run with TRITON_INTERPRET=1 in the environment",
            allow_module_level=True,
        )

try:  # the installed package layout
    from modegpt_rt.kernels import reference, triton_attention, triton_fused

    from modegpt_rt import kernels as kernels_api
except Exception:  # not installed, or the package __init__ is broken: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels as kernels_api
    from kernels import reference, triton_attention, triton_fused

if DEVICE == "cpu" and type(triton_attention._prefill_kernel).__name__ != "InterpretedFunction":
    # imported earlier without TRITON_INTERPRET=1: rebuild our kernels for the interpreter too
    triton_attention = importlib.reload(triton_attention)
if DEVICE == "cpu" and type(triton_fused._silu_mul_kernel).__name__ != "InterpretedFunction":
    triton_fused = importlib.reload(triton_fused)

REF_POISON = 7.0e3  # finite stand-in for NaN in the reference's caches
F64_TOL = dict(rtol=1e-9, atol=1e-9)
F32_TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor  # NaN in every slot outside [0, cache_lens[b])
    v_cache: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    freq_idx: torch.Tensor
    cache_lens: torch.Tensor
    new_lens: torch.Tensor
    scale: float

    def args(self, dtype=None, device=DEVICE):
        """Kernel arguments on `device` (fresh cache copies), float tensors cast to `dtype` if given."""
        cast = lambda x: x.to(device=device, dtype=dtype or x.dtype)  # noqa: E731
        dev = lambda x: x.to(device)  # noqa: E731
        return (
            cast(self.q), cast(self.k), cast(self.v), cast(self.k_cache).clone(), cast(self.v_cache).clone(),
            cast(self.cos), cast(self.sin), dev(self.freq_idx), dev(self.cache_lens), dev(self.new_lens), self.scale,
        )  # fmt: skip


def make_case(*, seed, B, T, H, H_kv, d_qk, d_v, S, cache_lens, new_lens, rope_rows=None, qk_view=False):
    """Random float64 inputs; rope tables are real RoPE tables with extra unused frequencies."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    half, full_half = d_qk // 2, d_qk // 2 + 5
    rope_rows = rope_rows if rope_rows is not None else S + 1
    inv_freq = 10000.0 ** (-torch.arange(full_half, dtype=f64) / full_half)
    angles = torch.arange(rope_rows, dtype=f64)[:, None] * inv_freq
    freq_idx = torch.stack([torch.randperm(full_half, generator=g)[:half].sort().values for _ in range(H_kv)])
    if qk_view:  # q/k/v as views into a fused projection output, as a model would pass them
        fused = torch.randn(B, T, H * d_qk + H_kv * (d_qk + d_v) + 3, generator=g, dtype=f64)
        q = fused[..., : H * d_qk].view(B, T, H, d_qk)
        k = fused[..., H * d_qk : (H + H_kv) * d_qk].view(B, T, H_kv, d_qk)
        v = fused[..., (H + H_kv) * d_qk : (H + H_kv) * d_qk + H_kv * d_v].view(B, T, H_kv, d_v)
    else:
        q = torch.randn(B, T, H, d_qk, generator=g, dtype=f64)
        k = torch.randn(B, T, H_kv, d_qk, generator=g, dtype=f64)
        v = torch.randn(B, T, H_kv, d_v, generator=g, dtype=f64)
    cache_lens = torch.tensor(cache_lens, dtype=torch.int32)
    new_lens = torch.tensor(new_lens, dtype=torch.int32)
    filled = torch.arange(S)[None, :] < cache_lens[:, None].long()  # [B, S]
    k_cache = torch.randn(B, H_kv, S, d_qk, generator=g, dtype=f64)
    v_cache = torch.randn(B, H_kv, S, d_v, generator=g, dtype=f64)
    k_cache[~filled[:, None, :, None].expand_as(k_cache)] = float("nan")
    v_cache[~filled[:, None, :, None].expand_as(v_cache)] = float("nan")
    scale = 1.0 / math.sqrt(d_qk + 3)
    return Case(q, k, v, k_cache, v_cache, angles.cos(), angles.sin(), freq_idx, cache_lens, new_lens, scale)


def reference_run(case: Case):
    """Reference output and caches in float64 on CPU; cache slots it does not write stay NaN."""
    q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale = case.args(device="cpu")
    poisoned_k, poisoned_v = k_cache.isnan(), v_cache.isnan()
    k_cache[poisoned_k] = REF_POISON
    v_cache[poisoned_v] = REF_POISON
    out = reference.attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
    T = q.shape[1]
    pos = torch.arange(k_cache.shape[2])[None, :]
    written = (pos >= cache_lens[:, None]) & (pos < (cache_lens + new_lens.clamp(max=T))[:, None])  # [B, S]
    k_cache[poisoned_k & ~written[:, None, :, None]] = float("nan")
    v_cache[poisoned_v & ~written[:, None, :, None]] = float("nan")
    assert not out.isnan().any()
    return out, k_cache, v_cache


def check(case: Case, out, k_cache, v_cache, tol):
    out, k_cache, v_cache = out.cpu(), k_cache.cpu(), v_cache.cpu()
    ref_out, ref_k, ref_v = reference_run(case)
    assert not out.isnan().any(), "NaN in the output (unwritten element or a poisoned cache slot was read)"
    valid = torch.arange(case.q.shape[1])[None, :] < case.new_lens[:, None]
    assert (out[~valid] == 0).all(), "rows t >= new_lens[b] must be exactly zero"
    torch.testing.assert_close(out.double(), ref_out, **tol)
    # the caches: written slots match, untouched poisoned slots are still NaN
    torch.testing.assert_close(k_cache.double(), ref_k, equal_nan=True, **tol)
    torch.testing.assert_close(v_cache.double(), ref_v, equal_nan=True, **tol)


def run_launchers(case: Case, dtype=None, **kw):
    """rope_append + prefill/decode launcher with a NaN-filled output buffer."""
    q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale = case.args(dtype)
    triton_attention.rope_append(k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens)
    B, T, H, _ = q.shape
    out = torch.full((B, T, H, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    launcher = triton_attention.decode_attention if T == 1 else triton_attention.prefill_attention
    result = launcher(q, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale, out=out, **kw)
    assert result is out
    return out, k_cache, v_cache


# --------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------

PREFILL_CASES = {
    # empty cache, G = 3, 23 rotary pairs, ragged lengths
    "empty_cache_gqa3": dict(B=2, T=7, H=6, H_kv=2, d_qk=46, d_v=17, S=24, cache_lens=[0, 0], new_lens=[7, 4]),
    # partially filled caches (lengths not multiples of 16), one sequence with no new tokens, G = 8, 1 pair
    "partial_cache_gqa8": dict(B=3, T=6, H=8, H_kv=1, d_qk=2, d_v=48, S=50, cache_lens=[5, 33, 0], new_lens=[6, 0, 3]),
    # no GQA, d_v > d_qk, prompt crosses several key tiles
    "mha_long_prompt": dict(B=2, T=21, H=2, H_kv=2, d_qk=46, d_v=64, S=60, cache_lens=[17, 0], new_lens=[21, 13]),
    # causal-diagonal tile boundaries: position of each row block's first token + 1 is a multiple of 16 +- 1
    "tile_edge": dict(B=3, T=10, H=4, H_kv=2, d_qk=6, d_v=5, S=40, cache_lens=[14, 22, 15], new_lens=[10, 9, 10]),
    # d_qk = 64 with d_v = 48, G = 3, row blocks straddle tokens
    "wide_gqa3": dict(B=1, T=11, H=3, H_kv=1, d_qk=64, d_v=48, S=40, cache_lens=[19], new_lens=[9]),
}


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "mulsum"])
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_triton_prefill_matches_reference_float64(name, use_dot):
    seed = 100 + list(PREFILL_CASES).index(name) * 2 + use_dot
    case = make_case(seed=seed, **PREFILL_CASES[name])
    check(case, *run_launchers(case, use_dot=use_dot), F64_TOL)


def test_triton_prefill_block_sizes_float64():
    case = make_case(seed=7, **PREFILL_CASES["partial_cache_gqa8"])
    check(case, *run_launchers(case, block_m=32, block_n=32), F64_TOL)


def test_triton_prefill_float32():
    case = make_case(seed=11, **PREFILL_CASES["partial_cache_gqa8"])
    check(case, *run_launchers(case, dtype=torch.float32), F32_TOL)
    case = make_case(seed=12, **PREFILL_CASES["empty_cache_gqa3"])
    # compiled for a GPU, Triton turns this multiply-sum into a TF32 dot (see the module's Numerics
    # notes; 1.7e-3 off on an H200): TF32 accuracy there, float32 in the interpreter
    tol = F32_TOL if DEVICE == "cpu" else dict(rtol=0, atol=1e-2)
    check(case, *run_launchers(case, dtype=torch.float32, use_dot=False), tol)


def test_triton_prefill_float16():
    case = make_case(seed=13, **PREFILL_CASES["empty_cache_gqa3"])
    out, k_cache, v_cache = run_launchers(case, dtype=torch.float16)
    ref_out, _, _ = reference_run(case)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=0, atol=2e-2)


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------

DECODE_CASES = {
    # G = 1, 23 pairs; the second sequence has no token this step, the third an empty cache
    "g1": dict(B=3, T=1, H=2, H_kv=2, d_qk=46, d_v=17, S=70, cache_lens=[37, 20, 0], new_lens=[1, 0, 1]),
    # G = 3 (padded to 4 / 16), d_v > d_qk
    "g3": dict(B=2, T=1, H=3, H_kv=1, d_qk=46, d_v=64, S=90, cache_lens=[70, 5], new_lens=[1, 1]),
    # G = 8, one rotary pair, d_v = 48
    "g8": dict(B=2, T=1, H=16, H_kv=2, d_qk=2, d_v=48, S=60, cache_lens=[59, 44], new_lens=[1, 1]),
}


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_triton_decode_splits_float64(name, num_splits):
    seed = 200 + list(DECODE_CASES).index(name) * 10 + num_splits
    case = make_case(seed=seed, **DECODE_CASES[name])
    check(case, *run_launchers(case, num_splits=num_splits), F64_TOL)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "mulsum"])
@pytest.mark.parametrize("name", ["g1", "g3"])
def test_triton_decode_dot_and_mulsum_float64(name, use_dot):
    case = make_case(seed=300 + 2 * (name == "g3") + use_dot, **DECODE_CASES[name])
    check(case, *run_launchers(case, num_splits=2, use_dot=use_dot), F64_TOL)


def test_triton_decode_float32():
    for i, name in enumerate(DECODE_CASES):
        case = make_case(seed=400 + i, **DECODE_CASES[name])
        check(case, *run_launchers(case, dtype=torch.float32, num_splits=1 + i), F32_TOL)


def test_triton_decode_half_precision():
    case = make_case(seed=410, **DECODE_CASES["g3"])
    out, _, _ = run_launchers(case, dtype=torch.float16, num_splits=2)
    torch.testing.assert_close(out.double().cpu(), reference_run(case)[0], rtol=0, atol=2e-2)
    # bfloat16 only on the multiply-sum path: the interpreter's tl.dot treats bf16 as raw uint16 bits
    case = make_case(seed=411, **DECODE_CASES["g3"])
    out, _, _ = run_launchers(case, dtype=torch.bfloat16, num_splits=2, use_dot=False)
    torch.testing.assert_close(out.double().cpu(), reference_run(case)[0], rtol=0, atol=6e-2)


# --------------------------------------------------------------------------------------
# attention(): the public entry point
# --------------------------------------------------------------------------------------


def test_triton_available_and_built_for_the_device():
    """Interpreted on CPU, compiled on a GPU: a GPU run must test the compiled kernels."""
    assert triton_attention.available()
    interpreted = type(triton_attention._prefill_kernel).__name__ == "InterpretedFunction"
    assert interpreted == (DEVICE == "cpu")


@pytest.mark.parametrize(
    "shape",
    [
        dict(B=2, T=5, H=6, H_kv=2, d_qk=46, d_v=17, S=30, cache_lens=[9, 0], new_lens=[5, 2]),
        dict(B=2, T=1, H=6, H_kv=2, d_qk=46, d_v=17, S=30, cache_lens=[9, 29], new_lens=[1, 1]),
    ],
    ids=["prefill", "decode"],
)
def test_triton_attention_entry_point_float64(shape):
    case = make_case(seed=500 + shape["T"], **shape)
    q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale = case.args()
    out = triton_attention.attention(q, k, v, k_cache, v_cache, cos, sin, freq_idx, cache_lens, new_lens, scale)
    assert out.shape == (shape["B"], shape["T"], shape["H"], shape["d_v"]) and out.dtype == torch.float64
    check(case, out, k_cache, v_cache, F64_TOL)


def test_triton_attention_through_backend_interface():
    case = make_case(seed=510, B=1, T=4, H=3, H_kv=3, d_qk=6, d_v=5, S=8, cache_lens=[2], new_lens=[4])
    assert kernels_api.resolve_backend("triton", DEVICE) == "triton"
    q, k, v, k_cache, v_cache, *rest = case.args()
    out = kernels_api.attention(q, k, v, k_cache, v_cache, *rest, backend="triton")
    check(case, out, k_cache, v_cache, F64_TOL)


def test_triton_strided_inputs_and_clamped_rope_rows():
    # q/k/v are views of one fused projection; the rope table is shorter than the positions
    # (the reference clamps the row index, so must the kernels)
    shape = dict(B=2, T=3, H=4, H_kv=2, d_qk=10, d_v=7, S=20, cache_lens=[12, 3], new_lens=[3, 3])
    for seed, T in ((520, 3), (521, 1)):
        case = make_case(seed=seed, **{**shape, "T": T, "new_lens": [T, T]}, rope_rows=9, qk_view=True)
        assert not case.q.is_contiguous()
        q, k, v, k_cache, v_cache, *rest = case.args()
        out = triton_attention.attention(q, k, v, k_cache, v_cache, *rest)
        check(case, out, k_cache, v_cache, F64_TOL)


def test_triton_prefill_then_decode_sequence():
    """A serving-like sequence of calls on shared caches: chunked prefill, then decode steps."""
    B, H, H_kv, d_qk, d_v, S = 3, 6, 2, 46, 17, 72
    base = make_case(seed=600, B=B, T=1, H=H, H_kv=H_kv, d_qk=d_qk, d_v=d_v, S=S, cache_lens=[0] * B, new_lens=[0] * B)
    ours_k, ours_v = base.k_cache.clone().to(DEVICE), base.v_cache.clone().to(DEVICE)  # all NaN
    ref_k, ref_v = base.k_cache.nan_to_num(REF_POISON), base.v_cache.nan_to_num(REF_POISON)
    lens = torch.zeros(B, dtype=torch.int32)
    steps = [(9, [9, 4, 0]), (5, [5, 2, 3]), (1, [1, 1, 1]), (1, [1, 0, 1]), (1, [1, 1, 1])]
    g = torch.Generator().manual_seed(601)
    for T, new in steps:
        new_lens = torch.tensor(new, dtype=torch.int32)
        q = torch.randn(B, T, H, d_qk, generator=g, dtype=torch.float64)
        k = torch.randn(B, T, H_kv, d_qk, generator=g, dtype=torch.float64)
        v = torch.randn(B, T, H_kv, d_v, generator=g, dtype=torch.float64)
        rope = (base.cos, base.sin, base.freq_idx, lens, new_lens, base.scale)
        on_dev = [x.to(DEVICE) if torch.is_tensor(x) else x for x in rope]
        out = triton_attention.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), ours_k, ours_v, *on_dev)
        ref = reference.attention(q, k, v, ref_k, ref_v, *rope)
        torch.testing.assert_close(out.cpu(), ref, **F64_TOL)
        lens = lens + new_lens
    ours_k, ours_v = ours_k.cpu(), ours_v.cpu()
    filled = (torch.arange(S)[None, :] < lens[:, None])[:, None, :, None]
    torch.testing.assert_close(ours_k, torch.where(filled, ref_k, float("nan")), equal_nan=True, **F64_TOL)
    torch.testing.assert_close(ours_v, torch.where(filled, ref_v, float("nan")), equal_nan=True, **F64_TOL)


# --------------------------------------------------------------------------------------
# launch parameters and input checks
# --------------------------------------------------------------------------------------


def test_triton_num_splits_heuristic():
    choose = triton_attention.choose_num_splits
    # LLaMA-2-7B decode at batch 256: 8192 programs already fill 132 SMs
    assert choose(256, 32, 512, 64, 132) == 1
    # one sequence, long cache: enough splits for 4 programs per SM, at most 64
    assert choose(1, 16, 32768, 64, 132) == math.ceil(4 * 132 / 16)
    assert choose(1, 1, 1 << 20, 64, 132) == 64
    # short cache: at least two tiles per split
    assert choose(1, 8, 256, 64, 132) == 2
    assert choose(1, 8, 64, 64, 132) == 1


def test_triton_rejects_bad_inputs():
    case = make_case(seed=700, B=2, T=3, H=4, H_kv=2, d_qk=6, d_v=5, S=8, cache_lens=[2, 0], new_lens=[3, 1])
    args = list(case.args())
    attention = triton_attention.attention

    def call(**changes):
        a = list(args)
        names = ["q", "k", "v", "k_cache", "v_cache", "cos", "sin", "freq_idx", "cache_lens", "new_lens", "scale"]
        for key, value in changes.items():
            a[names.index(key)] = value
        return attention(*a)

    with pytest.raises(ValueError, match="even"):
        call(q=args[0][..., :5], k=args[1][..., :5], k_cache=args[3][..., :5], freq_idx=args[7][:, :2])
    with pytest.raises(ValueError, match="multiple"):
        call(q=args[0][:, :, :3])
    with pytest.raises(ValueError, match="freq_idx"):
        call(freq_idx=args[7][:, :2])
    if DEVICE == "cpu":  # value checks that would need a device sync run on CPU tensors only
        with pytest.raises(ValueError, match="freq_idx"):
            call(freq_idx=args[7] + 100)
        with pytest.raises(ValueError, match="capacity"):
            call(cache_lens=torch.tensor([6, 0], dtype=torch.int32))
        with pytest.raises(ValueError, match="new_lens"):
            call(new_lens=torch.tensor([4, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="v_cache"):
        call(v_cache=args[4][:, :, :, :4])
    with pytest.raises(ValueError, match="dtype"):
        call(q=args[0].to(torch.int32))


def test_triton_module_imports_without_triton(monkeypatch):
    """Without triton the module still imports: available() is False and attention() explains why."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_attention_without_triton", triton_attention.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.available()
    case = make_case(seed=710, B=1, T=2, H=2, H_kv=1, d_qk=4, d_v=3, S=4, cache_lens=[0], new_lens=[2])
    with pytest.raises(RuntimeError, match="triton is not importable"):
        module.attention(*case.args())


@pytest.mark.parametrize("align", [False, True], ids=["as_saved", "aligned"])
def test_triton_decode_graph_static_step_float64(tiny_hf_dir, tmp_path, align, monkeypatch):
    """The decode step a CUDA graph captures, with the Triton kernels on a compressed model (d_qk ≠ d_v
    per layer), as saved and zero-padded by `load(align=True)` (the GPU default): the same logits as the
    torch reference's `Model.step` on the saved widths, float64. Run eagerly; on a GPU also captured and
    replayed."""
    from modegpt_rt.compressor.compress import CompressOptions, compress

    import modegpt_rt
    from modegpt_rt.checkpoint import save_checkpoint
    from modegpt_rt.decode_graph import DecodeGraph

    small = modegpt_rt.load(tiny_hf_dir, backend="torch")
    compress(small, torch.randint(0, 97, (4, 16)), CompressOptions(rate=0.3, bi_samples=2), progress=False)
    path = save_checkpoint(small, tmp_path / "c")
    ref = modegpt_rt.load(path, backend="torch", dtype=torch.float64)
    ours = modegpt_rt.load(path, device=DEVICE, backend="triton", dtype=torch.float64, align=align)
    assert (ours.config.layers != ref.config.layers) == align
    assert ours.backend == "triton" and ours.glue == "triton"  # the fused norm / SiLU·up kernels too
    calls = {"add_rms_norm": 0, "silu_mul": 0}

    def counting(name, fn):
        def counted(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return counted

    for name in calls:
        monkeypatch.setattr(triton_fused, name, counting(name, getattr(triton_fused, name)))
    lens = torch.tensor([4, 7, 1], dtype=torch.int32)
    batch = torch.randint(3, 97, (3, 7))
    for capture in (False, True) if DEVICE == "cuda" else (False,):
        caches = [ref.new_cache(3, 11), ours.new_cache(3, 11)]
        first = ours.step(batch.to(DEVICE), caches[1], lens.to(DEVICE))
        torch.testing.assert_close(first.cpu(), ref.step(batch, caches[0], lens), **F64_TOL)
        graph = DecodeGraph(ours, caches[1], capture=capture, warmup=1)
        ones = torch.ones(3, dtype=torch.int32)
        tok = torch.randint(3, 97, (3,))
        for _ in range(3):
            expect = ref.step(tok[:, None], caches[0], ones)
            torch.testing.assert_close(graph(tok.to(DEVICE)).cpu(), expect, **F64_TOL)
            tok = expect.argmax(-1)
        assert torch.equal(caches[1].lens.cpu(), caches[0].lens)
    # prefill and every graph step ran the fused glue (2L + 1 norms, L SiLU·up per step)
    L = len(ours.layers)
    assert calls["silu_mul"] >= 4 * L and calls["add_rms_norm"] == calls["silu_mul"] // L * (2 * L + 1)


def test_triton_aligned_layouts_compile_to_vector_loads(tmp_path):
    """Compiled ahead of time for sm_90 (no GPU needed, a fresh process without TRITON_INTERPRET): the fused
    glue kernels compile (they only ran in the interpreter here); rows of 8-aligned widths
    (`Model.align_widths` on a GPU) get 16-byte loads, unaligned rows 2-byte ones; the H200 read K/V at
    98% vs 45% of copy bandwidth for such layouts. Guards the launchers' VEC hint."""
    import json
    import subprocess

    out = tmp_path / "ptx.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "modegpt_rt.bench.triton_ptx", "--layouts", "88/90,80/104", "--glue"]
    subprocess.run([*cmd, "--json", str(out)], check=True, env=env, capture_output=True, timeout=300)
    doc = json.loads(out.read_text())
    # the fused glue kernels compile for every dtype the runtime serves, with 16-byte loads at 7B widths
    assert {(g["kernel"], g["dtype"]) for g in doc["glue"]} == {
        (k, d)
        for k in ("add_rms_norm_kernel", "silu_mul_kernel")
        for d in ("float16", "bfloat16", "float32", "float64")
    }
    assert all(any(op.startswith("ld.global.v") for op in g["loads"]) for g in doc["glue"]), doc["glue"]
    unaligned, aligned = doc["results"]
    for kernel in ("rope_append_kernel", "prefill_kernel", "decode_split_kernel"):
        assert unaligned[kernel]["VEC"] == 1 and aligned[kernel]["VEC"] == 8
        assert not any("v4" in op or "cp.async" in op for op in unaligned[kernel]["loads"]), unaligned[kernel]
        assert aligned[kernel]["loads"].get("ld.global.v4.b32", 0) > 0, aligned[kernel]
        assert aligned[kernel]["loads"].get("ld.global.b16", 0) < unaligned[kernel]["loads"]["ld.global.b16"]


def test_triton_vector_width_hint_keeps_results_float64():
    """Widths and strides that are multiples of 8 take the VEC = 8 path (the compiler is told so);
    prefill, decode and the cache append still match the reference. (The odd widths of the other
    tests take VEC = 1; a launcher that always chose 8 fails them.)"""
    assert triton_attention.vector_width(16, 24, 128) == 8 and triton_attention.vector_width(16, 20) == 1
    for seed, T, cache in ((800, 5, [3, 0]), (801, 1, [9, 17])):
        case = make_case(seed=seed, B=2, T=T, H=4, H_kv=2, d_qk=16, d_v=24, S=24, cache_lens=cache, new_lens=[T, T])
        q, k, v, k_cache, v_cache, *rest = case.args()
        assert triton_attention.vector_width(8, 24, *q.stride()[:3], *k_cache.stride()[:3]) == 8
        check(case, *run_launchers(case), F64_TOL)


def _rms_norm_reference(x, w, eps):
    from modegpt_rt.model import rms_norm

    return rms_norm(x, w, eps)


@pytest.mark.parametrize("n", [1, 37, 64, 130])
@pytest.mark.parametrize("with_delta", [True, False], ids=["delta", "no_delta"])
def test_triton_add_rms_norm_float64(n, with_delta):
    """Residual add in place + RMSNorm against `model.rms_norm` in float64, odd widths (masked lanes)."""
    g = torch.Generator().manual_seed(900 + n)
    h = torch.randn(2, 3, n, generator=g, dtype=torch.float64) * 3
    delta = torch.randn(2, 3, n, generator=g, dtype=torch.float64) if with_delta else None
    w = torch.randn(n, generator=g, dtype=torch.float64)
    expect_h = h + delta if with_delta else h.clone()
    expect = _rms_norm_reference(expect_h, w, 1e-5)
    h_dev = h.clone().to(DEVICE)
    out = triton_fused.add_rms_norm(h_dev, None if delta is None else delta.to(DEVICE), w.to(DEVICE), 1e-5)
    torch.testing.assert_close(out.cpu(), expect, **F64_TOL)
    torch.testing.assert_close(h_dev.cpu(), expect_h, **F64_TOL)


@pytest.mark.parametrize("k,block", [(1, 1024), (45, 16), (300, 64)])
def test_triton_silu_mul_float64(k, block):
    """silu(gate) * up against torch in float64; k not a multiple of the block (several column blocks)."""
    g = torch.Generator().manual_seed(950 + k)
    x = torch.randn(3, 2, 2 * k, generator=g, dtype=torch.float64) * 4
    expect = torch.nn.functional.silu(x[..., :k]) * x[..., k:]
    out = triton_fused.silu_mul(x.to(DEVICE), block=block)
    assert out.shape == (3, 2, k)
    torch.testing.assert_close(out.cpu(), expect, **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_glue_low_precision(dtype):
    """In float32/16 the fused ops round like the torch ops they replace (float32 statistics)."""
    g = torch.Generator().manual_seed(990)
    h = torch.randn(4, 96, generator=g).to(dtype)
    delta = torch.randn(4, 96, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    x = torch.randn(4, 2 * 70, generator=g).to(dtype)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}
    tol = tol.get(dtype, dict(rtol=3e-2, atol=1e-2))  # bfloat16: 8 bits, a few steps of rounding
    h_dev = h.clone().to(DEVICE)
    out = triton_fused.add_rms_norm(h_dev, delta.to(DEVICE), w.to(DEVICE), 1e-5)
    # the residual add rounds like torch's (exact); the interpreter's float32 -> bfloat16 cast truncates
    # where the GPU rounds to nearest, so there it may be one bfloat16 step off
    exact = DEVICE == "cuda" or dtype != torch.bfloat16
    torch.testing.assert_close(h_dev.cpu(), h + delta, rtol=0 if exact else 2**-7, atol=0)
    torch.testing.assert_close(out.cpu().float(), _rms_norm_reference(h + delta, w, 1e-5).float(), **tol)
    silu = triton_fused.silu_mul(x.to(DEVICE))
    expect = (torch.nn.functional.silu(x[:, :70].double()) * x[:, 70:].double()).float()
    torch.testing.assert_close(silu.cpu().float(), expect, **tol)


def test_triton_glue_rejects_bad_inputs():
    h = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="agree"):
        triton_fused.add_rms_norm(h, torch.zeros(2, 7, device=DEVICE), torch.ones(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="agree"):
        triton_fused.add_rms_norm(h, None, torch.ones(8, device=DEVICE, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        triton_fused.add_rms_norm(torch.zeros(8, 2, device=DEVICE).T, None, torch.ones(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="gate"):
        triton_fused.silu_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        triton_fused.silu_mul(torch.zeros(2, 8, device=DEVICE, dtype=torch.int32))


def test_triton_decode_sweep_checks_and_orders_every_config():
    # the GPU launch sweep (bench.triton_kernels --sweep): each configuration's output is compared with the
    # reference on the same inputs, one that cannot be built is recorded (not raised), fastest rows first
    try:
        from modegpt_rt.bench import triton_kernels as tk
    except ImportError:
        from bench import triton_kernels as tk
    shape = dict(B=3, H=6, H_kv=2, d_qk=10, d_v=12, S=37)  # GQA 3, odd pair count, d_v != d_qk
    times = iter([3.0, 1.0, 2.0, 4.0])

    def time_fn(fn):
        assert torch.isfinite(fn()).all()
        return {"median_ms": next(times)}

    grid = {"BLOCK_N": (16, 32, 3), "num_warps": (4,), "num_stages": (1, 2)}  # BLOCK_N 3: not a power of two
    rows = tk.sweep_decode(torch, reference, triton_attention, shape, time_fn, grid, torch.float32, DEVICE)
    assert len(rows) == 6
    ok, failed = rows[:4], rows[4:]
    assert [r["median_ms"] for r in ok] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["max_abs_err_vs_reference"] < 1e-4 for r in ok)
    assert all(r["BLOCK_N"] == 3 and "error" in r and "median_ms" not in r for r in failed)


def _triton_model_and_greedy_alone(tiny_hf_dir, tmp_path, prompts, limits):
    """A tiny model compressed by 30% and loaded on the Triton backend in float64 (padded widths on a GPU, as
    `load` defaults), and the greedy tokens the float64 torch reference generates for each prompt alone."""
    from modegpt_rt.compressor.compress import CompressOptions, compress

    import modegpt_rt
    from modegpt_rt.checkpoint import save_checkpoint

    small = modegpt_rt.load(tiny_hf_dir, backend="torch")
    compress(small, torch.randint(0, 97, (4, 16)), CompressOptions(rate=0.3, bi_samples=2), progress=False)
    path = save_checkpoint(small, tmp_path / "c")
    ref = modegpt_rt.load(path, backend="torch", dtype=torch.float64)
    ours = modegpt_rt.load(path, device=DEVICE, backend="triton", dtype=torch.float64)
    want = [
        ref.generate([p], max_new_tokens=m, temperature=0, ignore_eos=True)[0].token_ids
        for p, m in zip(prompts, limits)
    ]
    return ours, want


def test_triton_continuous_batch_matches_generate_alone(tiny_hf_dir, tmp_path):
    """ContinuousBatch (the server's continuous batching) on the Triton backend, sequences joining a running
    batch and leaving it, a row refilled: each gets the greedy tokens the torch reference generates alone
    (float64; on a GPU with the padded widths of `load`'s default)."""
    from modegpt_rt.generate import ContinuousBatch

    prompts, limits = [[5, 6, 7], [8, 9, 10, 11, 12], [14], [20, 21]], [5, 2, 4, 3]
    ours, want = _triton_model_and_greedy_alone(tiny_hf_dir, tmp_path, prompts, limits)
    batch = ContinuousBatch(ours, max_batch=2, min_capacity=8)
    got, nxt = {}, 0
    while nxt < len(prompts) or len(batch):
        if len(batch) < 2 and nxt < len(prompts):
            batch.add(prompts[nxt], limits[nxt], temperature=0, ignore_eos=True, index=nxt)
            nxt += 1
        for seq in batch.step():
            got[seq.index] = seq.result.token_ids
    assert [got[i] for i in range(len(prompts))] == want


def test_triton_generate_ragged_limits_match_the_reference(tiny_hf_dir, tmp_path):
    """`generate` on the Triton backend with one limit per prompt: without a CUDA graph the prompts run as a
    ContinuousBatch whose ended rows leave (on a GPU too since the seventeenth session), with one the fixed
    batch is replayed (GPU only); both give each prompt the greedy tokens the float64 torch reference
    generates alone, on the compressed model (padded widths on a GPU, as `load` defaults)."""
    prompts, limits = [[5, 6, 7], [8, 9, 10, 11, 12], [14], [20, 21]], [5, 2, 6, 3]
    ours, want = _triton_model_and_greedy_alone(tiny_hf_dir, tmp_path, prompts, limits)
    for graph in (False, True) if DEVICE == "cuda" else (False,):
        got = ours.generate(prompts, limits, temperature=0, ignore_eos=True, cuda_graph=graph)
        assert [r.token_ids for r in got] == want, f"cuda_graph={graph}"


@pytest.mark.skipif(DEVICE != "cuda", reason="moves a model onto a CUDA device")
def test_triton_model_moved_to_cuda_chooses_triton(tiny_hf_dir, tmp_path):
    """A model loaded on the CPU and moved with `.to("cuda")` (as users and transformers' `.to()` do) runs the
    Triton backend with its fused glue there, gives the float64 reference's tokens, and moved back chooses a
    CPU backend again (`Model._apply`)."""
    import modegpt_rt

    cpu = modegpt_rt.load(tiny_hf_dir, dtype=torch.float64)
    ref = modegpt_rt.load(tiny_hf_dir, backend="torch", dtype=torch.float64)
    assert cpu.backend != "triton"
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    want = [r.token_ids for r in ref.generate(prompts, max_new_tokens=6, temperature=0, ignore_eos=True)]
    moved = cpu.to("cuda")
    assert moved is cpu and cpu.device.type == "cuda" and cpu.backend == "triton" and cpu.glue == "triton"
    assert cpu.cos.device.type == "cuda" and cpu.cos.dtype == torch.float64
    for graph in (False, True):
        got = cpu.generate(prompts, max_new_tokens=6, temperature=0, ignore_eos=True, cuda_graph=graph)
        assert [r.token_ids for r in got] == want, f"cuda_graph={graph}"
    cpu.to("cpu")
    assert cpu.backend != "triton" and cpu.device.type == "cpu"
    got = cpu.generate(prompts, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in got] == want


def test_triton_decode_config_follows_the_gpu_sweep(monkeypatch):
    """The decode tiles a GPU gets (the interpreter's own small tiles aside), as the H200 sweep of
    bench/results/gpu_h200_s18 found them at batch 256, cache 512, fp16: 64 keys a tile for narrow heads
    without GQA (48/40: 0.291 against 0.317 ms at 32) where the cache is not split, 32 keys and 4 warps
    otherwise."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # decode_config reads it to tell the interpreter from a GPU
    monkeypatch.setattr(triton_attention, "_num_sms", lambda device: 132)

    def tiles(h_kv, d_qk, d_v, dtype=torch.float16, batch=256):
        c = triton_attention.decode_config(batch, 32, h_kv, d_qk, d_v, 512, dtype, "cuda")
        return c["BLOCK_N"], c["num_warps"], c["num_splits"]

    assert tiles(32, 48, 40) == tiles(32, 32, 24) == tiles(32, 48, 40, torch.bfloat16) == (64, 4, 1)
    assert tiles(32, 112, 112) == tiles(32, 128, 120) == tiles(32, 128, 128) == tiles(32, 96, 96) == (32, 4, 1)
    assert tiles(8, 48, 40) == (32, 4, 1)  # GQA: the dot variant, not swept narrow
    assert tiles(32, 48, 40, torch.float32)[0] == 32
    # a batch too small to fill 132 SMs splits the cache; 64-key tiles were not measured there: 32 keys
    assert tiles(32, 48, 40, batch=16) == (32, 4, 2) and tiles(32, 48, 40, batch=1) == (32, 4, 8)
