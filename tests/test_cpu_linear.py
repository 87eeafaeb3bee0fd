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


def test_cpu_linear_batched_shapes_and_fallbacks():
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    assert torch.allclose(cpu_linear.linear(x, w), F.linear(x, w), atol=1e-5)
    big = torch.randn(40, 40)  # more rows than the skinny kernel takes: torch path
    assert torch.equal(cpu_linear.linear(big, w), F.linear(big, w))
    xd, wd = x.double(), w.double()  # other dtypes: torch path
    assert torch.equal(cpu_linear.linear(xd, wd), F.linear(xd, wd))
    with pytest.raises(ValueError, match="features"):
        cpu_linear.linear(torch.randn(1, 39), w)


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
