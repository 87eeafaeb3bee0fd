"""The C++ CPU attention kernel (kernels/csrc/attention.cpp via kernels/cpu.py) against the torch reference.

Every case draws fresh random inputs from its own seed. The kernel's caches have every slot at
or past cache_lens[b] poisoned with NaN (the kernel must neither read them nor leave NaN where it
writes); the reference gets a finite poison there instead, since its masked matmul would turn NaN
into NaN outputs. Outputs are compared in float64 to 1e-10, caches exactly (slot by slot,
untouched ones included), and a NaN-filled `out` handed straight to the extension must come back
fully written. Shapes are awkward on purpose: odd rotary pair counts, d_v != d_qk, GQA ratios
1/3/8, ragged batches with an empty sequence, prefill into empty and partly filled caches,
decode, caches larger than needed, and runs longer than one softmax chunk.
"""

import math
import os
import zlib

import pytest
import torch
from modegpt_rt.kernels import cpu, reference

if os.environ.get("CI") and not cpu.available():  # CI builds the extension: its absence is a failure there
    raise RuntimeError(f"the C++ CPU attention extension is not built: {cpu.load_error()}")
pytestmark = pytest.mark.skipif(
    not cpu.available(), reason=f"the C++ CPU attention extension is not built: {cpu.load_error()}"
)

REF_POISON = 7.0e3  # finite stand-in for NaN in the reference's caches
F64_ATOL = 1e-10
F32_TOL = dict(rtol=1e-4, atol=2e-5)


def rope_tables(P, head_dim, dtype=torch.float64, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def make_case(
    seed,
    B,
    T,
    H_kv,
    G,
    d_qk,
    d_v,
    cache_lens,
    new_lens,
    *,
    extra_slots=5,
    dtype=torch.float64,
    P=None,
    q_gain=1.0,
    fidx_dtype=torch.int64,
):
    """Random inputs. Cached slots < cache_lens[b] hold finite data; later slots are poisoned."""
    g = torch.Generator().manual_seed(seed)
    H = H_kv * G
    half = d_qk // 2
    cache_lens = torch.tensor(cache_lens, dtype=torch.int32)
    new_lens = torch.tensor(new_lens, dtype=torch.int32)
    S = int((cache_lens + T).max()) + extra_slots
    head_dim = 2 * (half + 3)  # the full model head keeps `half` of its half + 3 rotary pairs
    P = P if P is not None else S + 4
    cos, sin = rope_tables(P, head_dim)
    freq_idx = torch.stack([torch.randperm(head_dim // 2, generator=g)[:half].sort().values for _ in range(H_kv)])

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = rnd(B, T, H, d_qk) * q_gain
    k = rnd(B, T, H_kv, d_qk)
    v = rnd(B, T, H_kv, d_v)
    k_cache = rnd(B, H_kv, S, d_qk)
    v_cache = rnd(B, H_kv, S, d_v)
    unused = torch.arange(S)[None, :] >= cache_lens[:, None].long()  # [B, S]
    k_cache[unused[:, None, :, None].expand_as(k_cache)] = float("nan")
    v_cache[unused[:, None, :, None].expand_as(v_cache)] = float("nan")
    return dict(
        q=q,
        k=k,
        v=v,
        k_cache=k_cache,
        v_cache=v_cache,
        cos=cos,
        sin=sin,
        freq_idx=freq_idx.to(fidx_dtype),
        cache_lens=cache_lens,
        new_lens=new_lens,
        scale=1.0 / math.sqrt(d_qk),
    )


def run_reference(case):
    c = dict(case)
    c["k_cache"] = torch.nan_to_num(case["k_cache"].clone(), nan=REF_POISON)
    c["v_cache"] = torch.nan_to_num(case["v_cache"].clone(), nan=REF_POISON)
    out = reference.attention(**c)
    return out, c["k_cache"], c["v_cache"]


def run_cpu(case):
    c = dict(case)
    c["k_cache"] = case["k_cache"].clone()
    c["v_cache"] = case["v_cache"].clone()
    out = cpu.attention(**c)
    return out, c["k_cache"], c["v_cache"]


def run_raw_poisoned_out(case):
    """Straight to the extension with a NaN-filled `out`: every element must be written."""
    q = case["q"]
    B, T, H, _ = q.shape
    d_v = case["v"].shape[3]
    out = torch.full((B, T, H, d_v), float("nan"), dtype=q.dtype)
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    cpu._ext.attention(
        q.numpy(),
        case["k"].numpy(),
        case["v"].numpy(),
        kc.numpy(),
        vc.numpy(),
        case["cos"].to(q.dtype).numpy(),
        case["sin"].to(q.dtype).numpy(),
        case["freq_idx"].to(torch.int32).numpy(),
        case["cache_lens"].numpy(),
        case["new_lens"].numpy(),
        case["scale"],
        out.numpy(),
    )
    return out, kc, vc


def check_case(case, atol=F64_ATOL, rtol=0.0):
    ref_out, ref_kc, ref_vc = run_reference(case)
    valid = torch.arange(case["q"].shape[1])[None, :] < case["new_lens"][:, None].long()
    for out, kc, vc in (run_cpu(case), run_raw_poisoned_out(case)):
        assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
        assert not out.isnan().any(), "output not fully written (NaN left from the poisoned buffer)"
        assert (out[~valid] == 0).all(), "rows past new_lens must be zero"
        torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
        # caches: written slots bit-identical to the reference's, untouched slots still poisoned
        assert torch.equal(torch.nan_to_num(kc, nan=REF_POISON), ref_kc), "k_cache differs from the reference"
        assert torch.equal(torch.nan_to_num(vc, nan=REF_POISON), ref_vc), "v_cache differs from the reference"


# (B, T, cache_lens, new_lens): prefill into empty caches, prefill into partly filled caches,
# a ragged batch with an empty sequence, decode, ragged decode with an idle sequence.
MODES = {
    "prefill_empty": (2, 9, [0, 0], [9, 9]),
    "prefill_partial": (2, 6, [5, 11], [6, 6]),
    "ragged": (3, 5, [3, 0, 8], [5, 2, 0]),
    "decode": (3, 1, [17, 0, 40], [1, 1, 1]),
    "decode_ragged": (2, 1, [12, 3], [1, 0]),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("G", [1, 3, 8])
@pytest.mark.parametrize("d_v", [1, 17, 48, 64])
@pytest.mark.parametrize("d_qk", [2, 46, 64])
def test_cpu_kernel_matches_reference_f64(d_qk, d_v, G, mode):
    B, T, cl, nl = MODES[mode]
    seed = zlib.crc32(f"{d_qk}/{d_v}/{G}/{mode}".encode())
    torch.manual_seed(seed)
    case = make_case(seed, B, T, H_kv=2, G=G, d_qk=d_qk, d_v=d_v, cache_lens=cl, new_lens=nl)
    check_case(case)


@pytest.mark.parametrize(
    "B,T,cl,nl,G,d_qk,d_v",
    [
        (2, 70, [100, 0], [70, 33], 3, 64, 64),  # several softmax chunks, causal tiles straddling them
        (1, 130, [0], [130], 8, 46, 17),
        (3, 1, [300, 64, 63], [1, 1, 1], 3, 64, 48),  # decode across chunk boundaries
        (2, 1, [511, 128], [1, 1], 1, 2, 1),
        (2, 5, [3, 0], [5, 4], 3, 300, 260),  # rows wider than the kernel's stack scratch
        (2, 1, [40, 7], [1, 1], 2, 258, 300),
    ],
)
def test_cpu_kernel_long_contexts_f64(B, T, cl, nl, G, d_qk, d_v):
    seed = 1000 + B * 7 + T + G
    check_case(make_case(seed, B, T, H_kv=3, G=G, d_qk=d_qk, d_v=d_v, cache_lens=cl, new_lens=nl))


def test_cpu_kernel_large_scores_stay_finite_f64():
    """Scores of magnitude ~1e3: the online softmax must rescale, not overflow."""
    case = make_case(7, 2, 6, H_kv=2, G=3, d_qk=64, d_v=32, cache_lens=[80, 3], new_lens=[6, 4], q_gain=300.0)
    check_case(case, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "B,T,cl,nl,G,d_qk,d_v",
    [
        (1, 1, [200], [1], 3, 64, 64),  # SmolLM2-135M decode shape (H=9, H_kv=3, head_dim 64)
        (8, 1, [200, 0, 17, 64, 100, 255, 1, 31], [1, 1, 1, 1, 1, 1, 1, 0], 3, 64, 64),
        (1, 128, [0], [128], 3, 64, 64),  # SmolLM2 prefill
        (3, 5, [3, 0, 8], [5, 2, 0], 8, 46, 17),
        (2, 9, [0, 4], [9, 7], 1, 2, 1),
    ],
)
def test_cpu_kernel_matches_reference_f32(B, T, cl, nl, G, d_qk, d_v):
    seed = 2000 + B * 11 + T + G + d_qk
    case = make_case(seed, B, T, H_kv=3, G=G, d_qk=d_qk, d_v=d_v, cache_lens=cl, new_lens=nl, dtype=torch.float32)
    check_case(case, **F32_TOL)


def test_cpu_kernel_strided_qkv_views_and_int64_lens():
    """q/k/v as views of one fused projection output; int64 lens and freq_idx are converted."""
    torch.manual_seed(11)
    B, T, H_kv, G, d_qk, d_v = 2, 4, 2, 3, 46, 17
    H = H_kv * G
    base = make_case(11, B, T, H_kv, G, d_qk, d_v, cache_lens=[6, 1], new_lens=[4, 3])
    fused = torch.randn(B, T, H * d_qk + H_kv * d_qk + H_kv * d_v, dtype=torch.float64)
    q, k, v = fused.split([H * d_qk, H_kv * d_qk, H_kv * d_v], dim=-1)
    case = dict(base, q=q.view(B, T, H, d_qk), k=k.view(B, T, H_kv, d_qk), v=v.view(B, T, H_kv, d_v))
    assert not case["q"].is_contiguous()
    ref_out, ref_kc, ref_vc = run_reference(case)
    case64 = dict(case, cache_lens=case["cache_lens"].long(), new_lens=case["new_lens"].long())
    out, kc, vc = run_cpu(case64)
    torch.testing.assert_close(out, ref_out, atol=F64_ATOL, rtol=0)
    assert torch.equal(torch.nan_to_num(kc, nan=REF_POISON), ref_kc)
    assert torch.equal(torch.nan_to_num(vc, nan=REF_POISON), ref_vc)


def test_cpu_kernel_cached_tables_follow_in_place_edits():
    """cos/sin converted to float32 are cached per table; an in-place edit of the table must show."""
    case = make_case(21, 1, 3, H_kv=1, G=3, d_qk=8, d_v=8, cache_lens=[2], new_lens=[3], dtype=torch.float32)
    assert case["cos"].dtype == torch.float64  # the kernel gets a converted (cached) copy
    for _ in range(2):
        check_case(case, **F32_TOL)
        case["cos"].mul_(0.5)  # same tensor object, new contents
        case["sin"].add_(0.25)
    with torch.inference_mode():  # inference tensors have no version counter: edits must still show
        case = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        for _ in range(2):
            check_case(case, **F32_TOL)
            case["cos"].mul_(0.5)


def test_cpu_kernel_positions_past_rope_table_and_new_lens_past_T():
    """Like the reference: rope rows clamp at the table's last row; new_lens > T counts as T."""
    case = make_case(31, 2, 4, H_kv=2, G=2, d_qk=8, d_v=6, cache_lens=[9, 2], new_lens=[4, 9], P=8)
    check_case(case)


def test_cpu_kernel_new_lens_past_T_with_a_full_cache():
    """new_lens > T near capacity: cache_lens + new_lens would overrun S, but only T tokens are new."""
    check_case(make_case(32, 1, 2, H_kv=1, G=2, d_qk=4, d_v=3, cache_lens=[3], new_lens=[5], extra_slots=0))


def test_cpu_kernel_rejects_lengths_that_would_wrap():
    case = _good_args()
    for lens in (torch.tensor([2**32 + 1, 0]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="lengths must lie in"):
            cpu.attention(**dict(case, cache_lens=lens))


def test_cpu_kernel_same_result_on_one_and_two_threads():
    case = make_case(41, 2, 33, H_kv=3, G=3, d_qk=64, d_v=64, cache_lens=[50, 0], new_lens=[33, 20])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_cpu(case)
        torch.set_num_threads(2)
        two = run_cpu(case)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def _good_args(dtype=torch.float64):
    case = make_case(51, 2, 3, H_kv=2, G=2, d_qk=8, d_v=6, cache_lens=[1, 0], new_lens=[3, 2], dtype=dtype)
    case["k_cache"] = torch.nan_to_num(case["k_cache"])
    case["v_cache"] = torch.nan_to_num(case["v_cache"])
    return case


@pytest.mark.parametrize(
    "name,bad,pattern",
    [
        ("k", lambda c: c["k"][..., :6].contiguous(), r"k: expected shape .*\(2, 3, 2, 8\).*got \(2, 3, 2, 6\)"),
        ("v", lambda c: c["v"][:, :2].contiguous(), r"v: expected shape .*\(2, 3, 2, 6\).*got \(2, 2, 2, 6\)"),
        (
            "k_cache",
            lambda c: c["k_cache"][:, :1].contiguous(),
            r"k_cache: expected shape .*\(2, 2, 9, 8\).*got \(2, 1, 9, 8\)",
        ),
        (
            "v_cache",
            lambda c: c["v_cache"][..., :5].contiguous(),
            r"v_cache: expected shape .*\(2, 2, 9, 6\).*got \(2, 2, 9, 5\)",
        ),
        ("freq_idx", lambda c: c["freq_idx"][:, :3].contiguous(), r"freq_idx: expected shape .*\(2, 4\).*got \(2, 3\)"),
        ("sin", lambda c: c["sin"][:5].contiguous(), r"sin: expected shape .*got \(5, 7\)"),
        ("cache_lens", lambda c: c["cache_lens"][:1].contiguous(), r"cache_lens: expected shape .*\(2,\).*got \(1,\)"),
        ("new_lens", lambda c: torch.zeros(3, dtype=torch.int32), r"new_lens: expected shape .*\(2,\).*got \(3,\)"),
    ],
)
def test_cpu_kernel_rejects_wrong_shapes(name, bad, pattern):
    case = _good_args()
    case[name] = bad(case)
    with pytest.raises(ValueError, match=pattern):
        cpu.attention(**case)


def test_cpu_kernel_rejects_bad_arguments():
    case = _good_args()
    with pytest.raises(ValueError, match=r"k: H_kv = 2 must divide H = 3"):
        cpu.attention(**dict(case, q=case["q"][:, :, :3].contiguous()))
    with pytest.raises(ValueError, match=r"q: d_qk must be even"):
        odd = dict(case, q=case["q"][..., :7].contiguous(), k=case["k"][..., :7].contiguous())
        cpu.attention(**odd)
    with pytest.raises(ValueError, match=r"k_cache: expected dtype float64, got float32"):
        cpu.attention(**dict(case, k_cache=case["k_cache"].float()))
    with pytest.raises(ValueError, match=r"v: expected dtype float64, got float32"):
        cpu.attention(**dict(case, v=case["v"].float()))
    with pytest.raises(ValueError, match=r"q: .*float32 and float64.*bfloat16"):
        cpu.attention(**dict(case, q=case["q"].bfloat16()))
    with pytest.raises(ValueError, match=r"k_cache: must be C-contiguous"):
        cpu.attention(**dict(case, k_cache=case["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)))
    with pytest.raises(
        ValueError, match=r"k_cache: sequence 0 needs 7 cached \+ 3 new positions but the cache holds S = 9"
    ):
        cpu.attention(**dict(case, cache_lens=torch.tensor([7, 0], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"cache_lens: entry 1 is negative"):
        cpu.attention(**dict(case, cache_lens=torch.tensor([0, -1], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"freq_idx: entry 7 out of range for cos/sin with 7 frequencies"):
        fi = case["freq_idx"].clone()
        fi[1, 2] = 7
        cpu.attention(**dict(case, freq_idx=fi))
    with pytest.raises(ValueError, match=r"out: expected shape .*\(2, 3, 4, 6\).*got \(2, 3, 4, 5\)"):
        c = case
        cpu._ext.attention(
            c["q"].numpy(),
            c["k"].numpy(),
            c["v"].numpy(),
            c["k_cache"].numpy(),
            c["v_cache"].numpy(),
            c["cos"].numpy(),
            c["sin"].numpy(),
            c["freq_idx"].int().numpy(),
            c["cache_lens"].numpy(),
            c["new_lens"].numpy(),
            c["scale"],
            torch.empty(2, 3, 4, 5, dtype=torch.float64).numpy(),
        )


def test_cpu_kernel_rejects_non_cpu_or_grad_tensors_clearly():
    case = _good_args()
    q = case["q"].clone().requires_grad_(True)  # requires_grad is fine (detached), not an error
    ref = reference.attention(**dict(_good_args(), q=q.detach()))
    out = cpu.attention(**dict(case, q=q))
    torch.testing.assert_close(out, ref, atol=F64_ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"k: expected a torch.Tensor"):
        cpu.attention(**dict(_good_args(), k=case["k"].numpy()))
