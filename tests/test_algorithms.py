"""Each MoDeGPT algorithm against brute force on small random matrices (float64)."""

import math

import pytest
import torch
from modegpt_rt.compressor.algorithms import (
    allocate_by_cost,
    allocate_sparsity,
    cr_key_query,
    nystrom_mlp,
    pair_dims,
    pair_energy,
    refine_costs,
    ridge_leverage_scores,
    svd_value_output,
)
from modegpt_rt.compressor.widths import Multiples, widths_for_sparsity
from modegpt_rt.kernels.reference import apply_rope

from modegpt_rt.config import ModelConfig


@pytest.fixture(autouse=True)
def _float64():
    """Brute-force checks in float64; restored afterwards so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _psd(d, seed, tokens=200):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d, generator=g) * torch.linspace(0.2, 2.0, d)
    return X, X.T @ X


def _sqrtm(C):
    e, Q = torch.linalg.eigh(C)
    return Q @ torch.diag(e.clamp(min=0).sqrt()) @ Q.T


def _type3_error(C, Wv, Wos, Wv_hat, Wos_hat):
    return sum(
        torch.trace((Wv @ Wo - Wv_hat @ Wo_hat).T @ C @ (Wv @ Wo - Wv_hat @ Wo_hat)).item()
        for Wo, Wo_hat in zip(Wos, Wos_hat)
    )


@pytest.mark.parametrize("G,k", [(1, 3), (3, 2), (3, 5), (4, 1)])
def test_type3_stacked_svd_is_optimal(G, k):
    d, dh = 14, 6
    g = torch.Generator().manual_seed(10 * G + k)
    _, C = _psd(d, seed=G + k)
    Wv = torch.randn(d, dh, generator=g)
    Wos = [torch.randn(dh, d, generator=g) for _ in range(G)]
    Wv_hat, Wos_hat = svd_value_output(C, Wv, Wos, k, "stacked")
    assert Wv_hat.shape == (d, k) and all(w.shape == (k, d) for w in Wos_hat)
    err = _type3_error(C, Wv, Wos, Wv_hat, Wos_hat)
    # exact optimum: truncated SVD of C^{1/2} W_v [W_o,1 ... W_o,G] (Theorem 3, stacked)
    s = torch.linalg.svdvals(_sqrtm(C) @ Wv @ torch.cat(Wos, 1))
    assert err == pytest.approx((s[k:] ** 2).sum().item(), rel=1e-8, abs=1e-8)
    # no other rank-k reduction tried does better
    b1 = _type3_error(C, Wv, Wos, *svd_value_output(C, Wv, Wos, k, "b1"))
    assert err <= b1 + 1e-9
    for _ in range(20):
        A = torch.randn(dh, k, generator=g)
        Wv_try = Wv @ A
        # best W_o for this W_v (least squares in the C-metric), so the alternative is at its strongest
        M = Wv_try.T @ C @ Wv_try
        Wos_try = [torch.linalg.solve(M, Wv_try.T @ C @ Wv @ Wo) for Wo in Wos]
        assert err <= _type3_error(C, Wv, Wos, Wv_try, Wos_try) + 1e-9
    # plain (unweighted) SVD of the product is another rank-k reduction
    U, S, Vh = torch.linalg.svd(Wv @ torch.cat(Wos, 1), full_matrices=False)
    plain_o = (S[:k, None] * Vh[:k]).split(d, dim=1)
    assert err <= _type3_error(C, Wv, Wos, U[:, :k], list(plain_o)) + 1e-9


def test_type3_full_rank_is_exact():
    _, C = _psd(10, seed=3)
    Wv, Wos = torch.randn(10, 4), [torch.randn(4, 10), torch.randn(4, 10)]
    Wv_hat, Wos_hat = svd_value_output(C, Wv, Wos, 4)
    assert _type3_error(C, Wv, Wos, Wv_hat, Wos_hat) < 1e-9


def test_type2_scores_match_brute_force_group_score():
    d, dh, H, Hkv = 16, 8, 6, 2
    X, C = _psd(d, seed=5)
    Wq, Wk = torch.randn(d, H * dh), torch.randn(d, Hkv * dh)
    eq, ek = pair_energy(Wq, C, dh), pair_energy(Wk, C, dh)
    # brute force: activations, per-dimension C_ii, pair sums, sqrt of the sum over the group's heads
    Q, K = (X @ Wq).view(-1, H, dh), (X @ Wk).view(-1, Hkv, dh)
    cq, ck = Q.pow(2).sum(0), K.pow(2).sum(0)
    half = dh // 2
    pq, pk = cq[:, :half] + cq[:, half:], ck[:, :half] + ck[:, half:]
    assert torch.allclose(eq, pq) and torch.allclose(ek, pk)
    idx = cr_key_query(eq, ek, 3)
    for gi in range(Hkv):
        score = torch.sqrt(sum(pq[h] * pk[gi] for h in range(gi * 3, gi * 3 + 3)))
        assert set(idx[gi].tolist()) == set(torch.topk(score, 3).indices.tolist())


@pytest.mark.parametrize("n_pairs", [1, 3, 4])
def test_type2_whole_pairs_commute_with_rope(n_pairs):
    dh, T = 8, 11
    g = torch.Generator().manual_seed(n_pairs)
    q, k = torch.randn(T, dh, generator=g), torch.randn(T, dh, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dh, 2) / dh))
    ang = torch.arange(T)[:, None] * inv_freq[None]
    cos, sin = ang.cos(), ang.sin()
    full_q, full_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoPE on all dims, then select
    idx = torch.topk(torch.rand(dh // 2, generator=g), n_pairs).indices.sort().values
    dims = pair_dims(idx, dh)
    red_q = apply_rope(q[:, dims], cos[:, idx], sin[:, idx])  # select, then RoPE with gathered rows
    red_k = apply_rope(k[:, dims], cos[:, idx], sin[:, idx])
    assert torch.allclose(red_q, full_q[:, dims], atol=1e-12)
    assert torch.allclose(red_k, full_k[:, dims], atol=1e-12)
    # so the reduced scores are exactly the full scores restricted to the kept pairs
    assert torch.allclose(red_q @ red_k.T, full_q[:, dims] @ full_k[:, dims].T, atol=1e-12)


def test_type2_single_dims_would_not_commute():
    """Selecting a lone dimension of a pair breaks RoPE: the reason selection is by whole pairs."""
    dh, T = 8, 5
    q = torch.randn(T, dh)
    ang = torch.arange(T)[:, None] * (1.0 / (10000 ** (torch.arange(0, dh, 2) / dh)))[None]
    full = apply_rope(q, ang.cos(), ang.sin())
    assert not torch.allclose(full[:, 0], q[:, 0])  # dim 0 alone is mixed with dim 4 by RoPE


def test_nystrom_leverage_scores_brute_force():
    X, C = _psd(12, seed=7)
    lam = 3.0
    s = ridge_leverage_scores(C, lam)
    assert torch.allclose(s, torch.diagonal(C @ torch.linalg.inv(C + lam * torch.eye(12))))


@pytest.mark.parametrize("k", [1, 5, 11])
def test_nystrom_down_projection_is_least_squares_optimal(k):
    g = torch.Generator().manual_seed(k)
    Hact = torch.randn(300, 12, generator=g) * torch.linspace(0.1, 3, 12)  # MLP activations
    C = Hact.T @ Hact
    Wd = torch.randn(12, 5, generator=g)
    idx, Wd_new = nystrom_mlp(C, Wd, k, ridge=0.1)
    assert idx.shape == (k,) and Wd_new.shape == (k, 5)
    # top-k ridge leverage scores
    scores = ridge_leverage_scores(C, 0.1 * C.diagonal().mean().item())
    assert set(idx.tolist()) == set(torch.topk(scores, k).indices.tolist())
    err = (Hact @ Wd - Hact[:, idx] @ Wd_new).pow(2).sum()
    lstsq = torch.linalg.lstsq(Hact[:, idx], Hact @ Wd).solution
    assert err.item() == pytest.approx((Hact @ Wd - Hact[:, idx] @ lstsq).pow(2).sum().item(), rel=1e-8)
    for _ in range(10):
        other = Wd_new + 0.01 * torch.randn(k, 5, generator=g)
        assert err <= (Hact @ Wd - Hact[:, idx] @ other).pow(2).sum() + 1e-9


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_allocation_keeps_mean_and_bounds(target):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(24, generator=g) * 0.3
    phi, eps = allocate_sparsity(s, target)
    assert phi.mean().item() == pytest.approx(target, abs=1e-9)
    assert phi.min() >= 0 and phi.max() <= 0.8 + 1e-6
    assert phi.max().item() == pytest.approx(0.8, abs=1e-3)  # the default eps rule
    order = torch.argsort(s)
    assert torch.all(phi[order][1:] <= phi[order][:-1] + 1e-12)  # more important -> less sparse
    # explicit eps and the closed form φ = L φ_avg softmax(-s/ε) when nothing is clipped
    phi2, _ = allocate_sparsity(s, target, eps=1.0)
    assert torch.allclose(phi2, len(s) * target * torch.softmax(-s / 1.0, 0))


def test_allocation_clips_and_weights():
    s = torch.tensor([5.0, 5.0, 5.0, 0.0])  # unclipped, the last entry would get φ ≈ 2
    phi, _ = allocate_sparsity(s, 0.5, eps=0.1, cap=0.9)
    assert phi.max().item() == pytest.approx(0.9) and phi.mean().item() == pytest.approx(0.5)
    params = torch.tensor([1.0, 1.0, 3.0, 3.0])
    phi, _ = allocate_sparsity(torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.3, params=params)
    assert (phi * params).sum().item() / params.sum().item() == pytest.approx(0.3)
    assert torch.all(phi <= 0.8 + 1e-6)


def test_allocation_uniform_cases():
    phi, eps = allocate_sparsity(torch.full((5,), 0.2), 0.3)
    assert torch.allclose(phi, torch.full((5,), 0.3)) and math.isinf(eps)
    phi, _ = allocate_sparsity(torch.rand(5), 0.0)
    assert torch.all(phi == 0)
    with pytest.raises(ValueError):
        allocate_sparsity(torch.rand(5), 0.99)
    s = torch.tensor([0.05, 0.1, 0.2, 0.4])  # the first layer caps at 0.95; the others' weights underflow
    with pytest.raises(ValueError, match="too small"):
        allocate_sparsity(s, 0.5, eps=1e-4)
    phi, eps = allocate_sparsity(s, 0.5, max_sparsity=0.94)  # the search steps over underflowing temperatures
    assert torch.isfinite(phi).all() and phi.max().item() == pytest.approx(0.94, abs=1e-6) and eps > 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_allocation_is_optimal_against_brute_force(seed):
    """Convex measured curves: the segment-greedy allocation meets the budget exactly and no point of a
    fine grid satisfying the same budget and cap has a lower total cost."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    levels = [0.2, 0.4, 0.6, 0.8]
    costs = (torch.rand(3, 4, generator=g) * torch.tensor([1.0, 2.0, 4.0, 8.0])).cumsum(1)  # convex-ish
    costs = torch.stack([torch.tensor(_convexify(levels, c.tolist())) for c in costs])
    params = torch.tensor([1.0, 2.0, 3.0])
    target, cap = 0.35, 0.6
    phi = allocate_by_cost(levels, costs, params, target, cap)
    assert float((phi * params).sum() / params.sum()) == pytest.approx(target, abs=1e-12)
    assert phi.min() >= 0 and phi.max() <= cap + 1e-12

    def total(ph):
        return sum(np.interp(p, [0.0, *levels], [0.0, *c.tolist()]) for p, c in zip(ph, costs))

    best = math.inf
    for a in np.linspace(0, cap, 121):
        for b in np.linspace(0, cap, 121):
            c = (target * float(params.sum()) - a - 2 * b) / 3
            if 0 <= c <= cap:
                best = min(best, total([a, b, c]))
    assert total(phi.tolist()) <= best + 1e-9


def _convexify(levels, ys):
    """Make a measured curve convex by raising its slopes to be non-decreasing (test data only)."""
    xs, out, slope = [0.0, *levels], [0.0], 0.0
    for x0, x1, y in zip(xs, xs[1:], ys):
        slope = max(slope, (y - out[-1]) / (x1 - x0))
        out.append(out[-1] + slope * (x1 - x0))
    return out[1:]


def test_cost_allocation_hull_cap_and_errors():
    levels = [0.25, 0.5, 0.75]
    # entry 0: a step (cost 1 at 0.25, then flat): its hull is the chord to (0.75, 1), 1.33 per unit;
    # entry 1: linear, 2 per unit. Entry 0 fills first, to the cap 0.75; entry 1 takes the rest.
    costs = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 1.5]])
    phi = allocate_by_cost(levels, costs, [1.0, 1.0], 0.5, cap=0.75)
    assert phi.tolist() == pytest.approx([0.75, 0.25])
    # noise below zero counts as zero cost; a cap between levels cuts the curve there (entry 0's last
    # piece, 0.5 -> 0.6, costs 11.2 per unit, dearer than entry 1's 2: entry 1 takes the rest)
    phi = allocate_by_cost(levels, torch.tensor([[-0.1, 0.2, 3.0], [0.5, 1.0, 1.5]]), [1.0, 1.0], 0.3, cap=0.6)
    assert phi.tolist() == pytest.approx([0.5, 0.1])
    with pytest.raises(ValueError, match="cap"):
        allocate_by_cost(levels, costs, [1.0, 1.0], 0.7, cap=0.6)
    with pytest.raises(ValueError, match="levels"):
        allocate_by_cost([0.5, 0.25, 0.75], costs, [1.0, 1.0], 0.3, cap=0.6)
    with pytest.raises(ValueError, match="last measured level"):
        allocate_by_cost(levels, costs, [1.0, 1.0], 0.3, cap=0.9)


def test_refine_costs_power_law_through_the_points():
    """The fine curve passes through every measured point, is exact for a power law (also below the first
    level), starts at 0, and turns noise (≤ 0, decreasing) into a positive non-decreasing curve."""
    levels = [0.2, 0.4, 0.6, 0.8]
    power = [[3.0 * x**1.7 for x in levels], [0.5, 1.0, 2.0, 8.0]]
    fine, out = refine_costs(levels, power)
    assert fine[0] == pytest.approx(0.01) and fine[-1] == pytest.approx(0.8) and len(fine) == 80
    for x, y in zip(levels, power[1]):
        assert out[1, round(x * 100) - 1] == pytest.approx(y)
    torch.testing.assert_close(out[0], 3.0 * fine**1.7)
    t = math.log(0.5 / 0.4) / math.log(0.6 / 0.4)  # between points: log-log linear
    assert out[1, 49] == pytest.approx(2.0**t)
    _, noisy = refine_costs(levels, [[-1e-3, 0.5, 0.4, 2.0]])
    assert torch.all(noisy > 0) and torch.all(noisy[0, 1:] >= noisy[0, :-1] * (1 - 1e-12))


@pytest.mark.parametrize("multiples", [Multiples(), Multiples(64, 4, 8)])
def test_widths_keep_global_budget(multiples):
    cfg = ModelConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    phi = [0.1, 0.5, 0.3, 0.2, 0.45, 0.25]
    widths = widths_for_sparsity(cfg, phi, phi, multiples)
    new = cfg.with_layers(widths)
    removed = 1 - sum(map(new.layer_params, range(6))) / sum(map(cfg.layer_params, range(6)))
    target = sum(p * cfg.layer_params(0) for p in phi) / (6 * cfg.layer_params(0))
    tol = 0.002 if multiples == Multiples() else 0.03
    assert removed == pytest.approx(target, abs=tol)
    for w in widths:
        assert w.d_qk % 2 == 0
        if multiples.mlp > 1:
            assert w.k_mlp % multiples.mlp == 0 and (w.d_qk // 2) % multiples.pairs == 0 and w.d_v % multiples.v == 0
