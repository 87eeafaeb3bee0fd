"""The C++ decode helpers (skinny product, fused residual-add + RMSNorm, SiLU·up) against torch."""

import os

import pytest
import torch
import torch.nn.functional as F
from modegpt_rt.kernels import cpu_linear

if os.environ.get("CI") and not cpu_linear.available():
    raise RuntimeError("the C++ extension _cpu_linear is not built")
pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="C++ extension _cpu_linear not built")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("k,n", [(1, 1), (15, 3), (16, 33), (577, 1001), (64, 2)])
def test_cpu_linear_matches_torch(rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    ref = (x.double() @ w.double().T).float()
    got = cpu_linear.linear(x, w)
    assert got.shape == (rows, n)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * k**0.5)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("k,n", [(1, 1), (15, 3), (16, 33), (577, 1001), (64, 2), (7, 600_000)])
def test_cpu_linear_bf16_weights_match_float64(rows, k, n):
    """bfloat16 weights, float32 inputs and outputs: the product of the widened weights (every tail width,
    the skinny kernel's row counts in blocks of 8, and the torch path above BF16_MAX_ROWS rows, which a
    matrix beyond BF16_LARGE elements such as 7 x 600000 keeps out of until BF16_LARGE_MAX_ROWS)."""
    g = torch.Generator().manual_seed(rows * 1000 + k + n + 7)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g).bfloat16()
    ref = (x.double() @ w.double().T).float()
    got = cpu_linear.linear(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * k**0.5)
    kernel = rows <= (cpu_linear.BF16_LARGE_MAX_ROWS if n * k >= cpu_linear.BF16_LARGE else cpu_linear.BF16_MAX_ROWS)
    assert (cpu_linear._max_rows(w) >= rows) == kernel


def test_cpu_linear_batched_shapes_and_fallbacks():
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    assert torch.allclose(cpu_linear.linear(x, w), F.linear(x, w), atol=1e-5)
    big = torch.randn(40, 40)  # more rows than the skinny kernel takes: torch path
    assert torch.equal(cpu_linear.linear(big, w), F.linear(big, w))
    xd, wd = x.double(), w.double()  # other dtypes: torch path
    assert torch.equal(cpu_linear.linear(xd, wd), F.linear(xd, wd))
    with pytest.raises(ValueError, match="features"):
        cpu_linear.linear(torch.randn(1, 39), w)
    for xe, we in ((torch.randn(0, 40), w), (torch.randn(2, 0), torch.randn(24, 0))):  # empty: as torch
        assert torch.equal(cpu_linear.linear(xe, we), F.linear(xe, we))


def test_cpu_linear_helpers_reject_what_they_would_misread():
    h, w = torch.randn(3, 16), torch.randn(16)
    bad_h = (h.double(), h.t().contiguous().t(), torch.randn(16).expand(3, 16))
    for b in bad_h:
        with pytest.raises(ValueError, match="contiguous float32"):
            cpu_linear.add_rms_norm(b, None, w, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        cpu_linear.add_rms_norm(h, None, torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="delta has shape"):
        cpu_linear.add_rms_norm(h, torch.randn(3, 8), w, 1e-5)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_linear.silu_mul(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        cpu_linear.silu_mul(torch.randn(3, 15))


@pytest.mark.parametrize("rows,dim", [(1, 576), (5, 17), (3, 1)])
def test_cpu_linear_add_rms_norm_and_silu_mul(rows, dim):
    g = torch.Generator().manual_seed(dim)
    h, d = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    w = torch.randn(dim, generator=g)
    h_ref = h + d
    ref = w * (h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = cpu_linear.add_rms_norm(h, d, w, 1e-5)
    assert torch.allclose(h, h_ref) and torch.allclose(out, ref, atol=1e-5)
    out2 = cpu_linear.add_rms_norm(h, None, w, 1e-5)  # no residual: h unchanged
    assert torch.allclose(out2, ref, atol=1e-5) and torch.allclose(h, h_ref)
    gu = torch.randn(rows, 2 * dim, generator=g)
    assert torch.allclose(cpu_linear.silu_mul(gu), F.silu(gu[:, :dim]) * gu[:, dim:], atol=1e-6)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1), (2, 2)])
def test_cpu_decode_plan_matches_torch_steps(heads, kv_heads, weights):
    """The one-call C++ decode step (all layers) against the torch step on a compressed random model:
    odd pair counts, d_v != d_qk, GQA, ragged new tokens (one sequence idle), several steps. With
    bfloat16 weights (`store_weights`) against the float32 torch model holding the same rounded values."""
    from conftest import random_config

    from modegpt_rt.config import LayerWidths
    from modegpt_rt.model import Model

    widths = (LayerWidths(48, 8, 8), LayerWidths(17, 6, 3), LayerWidths(5, 2, 7))
    cfg = random_config(num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=kv_heads, layers=widths)
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    ref = Model(cfg, backend="torch")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "norm" in name else 0.3))
            if p.dim() == 2:
                p.copy_(p.to(weights))  # the values bfloat16 storage keeps
        for layer in ref.layers:  # a random subset of rotary frequencies per KV group
            layer.freq_idx = torch.stack([torch.randperm(4, generator=g)[: layer.d_qk // 2] for _ in range(kv_heads)])
            layer.freq_idx = layer.freq_idx.sort(-1).values.to(torch.int32).contiguous()
    fused = Model(cfg, backend="torch")
    fused.load_state_dict(ref.state_dict())
    for a, b in zip(fused.layers, ref.layers):
        a.freq_idx = b.freq_idx.clone()
    assert fused.set_backend("cpu") == "cpu" and fused._fused
    if weights != torch.float32:
        fused.store_weights(weights)
        assert fused.weight_dtype == weights and fused.dtype == torch.float32 and fused._fused
        assert fused.layers[0].attn_norm.dtype == torch.float32 and fused.layers[0].w_down.dtype == weights
    caches = [m.new_cache(3, 12) for m in (ref, fused)]
    steps = [
        (torch.randint(0, 50, (3, 4), generator=g), torch.tensor([4, 2, 0], dtype=torch.int32)),  # ragged prefill
        (torch.randint(0, 50, (3, 1), generator=g), torch.tensor([1, 1, 1], dtype=torch.int32)),
        (torch.randint(0, 50, (3, 2), generator=g), torch.tensor([1, 2, 2], dtype=torch.int32)),
        (torch.randint(0, 50, (3, 1), generator=g), torch.tensor([1, 0, 1], dtype=torch.int32)),
    ]
    for ids, lens in steps:
        want = ref.step(ids, caches[0], lens.clone())
        got = fused.step(ids, caches[1], lens.clone())
        live = lens > 0
        assert torch.allclose(got[live], want[live], atol=2e-5, rtol=1e-4)
    assert caches[1].plan is not None and caches[1].plan[1].weights_bf16 == (weights == torch.bfloat16)
    for kr, kf in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert torch.allclose(kr, kf, atol=1e-5)


def test_skinny_linear_bench_runs(tmp_path):
    import json

    from modegpt_rt.bench import skinny_linear

    out = tmp_path / "s.json"
    skinny_linear.main(
        ["--shape", "40x33", "--rows", "1,3", "--mb", "1", "--rounds", "1", "--threads", "1"] + ["--json", str(out)]
    )
    res = json.loads(out.read_text())
    assert {(r["rows"], r["weight_dtype"]) for r in res["results"]} == {
        (m, d) for m in (1, 3) for d in ("float32", "bfloat16")
    }
    assert all(r["ms"] > 0 and r["weight_gb_s"] > 0 for r in res["results"])


def test_decode_thread_probe_runs(capsys):
    import json

    from modegpt_rt.bench import decode_thread

    decode_thread.main(["--probe"])
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"thread_before_main_us", "main_us", "thread_after_main_us"}
    assert all(v > 0 for v in res.values())


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_cpu_linear_prefetch_changes_no_result(weights):
    """The next-row prefetch (products of at least `get_prefetch_from()` rows) is a hint: with it on for
    every row count, or off, each row count's outputs are bit for bit the same."""
    from modegpt_rt.kernels import _cpu_linear

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 577, generator=g), torch.randn(301, 577, generator=g).to(weights)
    default = _cpu_linear.get_prefetch_from()
    assert 1 < default <= 8
    try:
        outs = {}
        for setting in (1, 9):
            _cpu_linear.set_prefetch_from(setting)
            outs[setting] = [cpu_linear.linear(x[:m], w) for m in range(1, 9)]
    finally:
        _cpu_linear.set_prefetch_from(default)
    ref = (x.double() @ w.double().T).float()
    for m, (a, b) in enumerate(zip(outs[1], outs[9]), start=1):
        assert torch.equal(a, b) and torch.allclose(a, ref[:m], rtol=1e-5, atol=1e-4)


def test_cpu_linear_three_row_blocks_change_no_result():
    """Products of 8 inputs with float32 weights and rows of at least 1024 read three weight rows at a time
    (`set_rows3_min_k`): bit for bit the one-row kernel's outputs, for row counts that leave one or two
    rows after the triples, widths with and without a masked tail, 16-row chunks split across threads, and
    shorter rows (which keep the one-row kernel)."""
    from modegpt_rt.kernels import _cpu_linear

    default = _cpu_linear.get_rows3_min_k()
    assert default == 1024
    g = torch.Generator().manual_seed(6)
    for n, k in ((301, 1537), (48, 1024), (95, 1536), (7, 1064), (64, 864), (7, 40)):
        x, w = torch.randn(8, k, generator=g), torch.randn(n, k, generator=g)
        try:
            outs = []
            for setting in (default, 0, 1 << 30):  # the default rule, always, never
                _cpu_linear.set_rows3_min_k(setting)
                outs.append(cpu_linear.linear(x, w))
            _cpu_linear.set_rows3_min_k(0)
            _cpu_linear.set_prefetch_from(9)  # three-row blocks without the prefetch
            outs.append(cpu_linear.linear(x, w))
        finally:
            _cpu_linear.set_rows3_min_k(default)
            _cpu_linear.set_prefetch_from(4)
        ref = (x.double() @ w.double().T).float()
        assert all(torch.equal(outs[0], o) for o in outs[1:]), (n, k)
        assert torch.allclose(outs[0], ref, rtol=1e-5, atol=1e-4), (n, k)


def test_prefetch_ab_bench_runs(tiny_hf_dir, tmp_path):
    import json

    from modegpt_rt.bench import prefetch_ab

    out = tmp_path / "p.json"
    prefetch_ab.main(
        [str(tiny_hf_dir), "--batch", "1,5", "--prompt", "4", "--new", "3", "--rounds", "1"]
        + ["--weights", "float32,bfloat16", "--threads", "1", "--json", str(out)]
    )
    res = json.loads(out.read_text())
    assert {(r["weights"], r["batch"]) for r in res["results"]} == {
        (w, b) for w in ("float32", "bfloat16") for b in (1, 5)
    }
    assert all(r["tok_s_off"] > 0 and r["tok_s_on"] > 0 for r in res["results"]) and res["prefetch_from"] == 4
    prefetch_ab.main(
        [str(tiny_hf_dir), "--switch", "rows3", "--batch", "8", "--prompt", "4", "--new", "3", "--rounds", "1"]
        + ["--threads", "1", "--json", str(out)]
    )
    res = json.loads(out.read_text())
    assert res["kind"] == "rows3_ab" and [r["batch"] for r in res["results"]] == [8]
    from modegpt_rt.kernels import _cpu_linear

    assert _cpu_linear.get_rows3_min_k() == 1024 and _cpu_linear.get_prefetch_from() == 4  # switches restored


def test_rows3_shapes_bench_runs(tmp_path):
    import json

    from modegpt_rt.bench import rows3_shapes
    from modegpt_rt.kernels import _cpu_linear

    out = tmp_path / "r.json"
    rows3_shapes.main(["--shapes", "48x1040,16x64", "--rounds", "1", "--mb", "1", "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert [(r["N"], r["K"]) for r in res["results"]] == [(48, 1040), (16, 64)]
    assert all(r["gflops"]["one_row"] > 0 and r["gflops"]["three_rows"] > 0 for r in res["results"])
    assert res["default_min_k"] == 1024 == _cpu_linear.get_rows3_min_k()  # restored
