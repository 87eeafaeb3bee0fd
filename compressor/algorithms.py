"""The MoDeGPT module decompositions and the global sparsity allocation.

Plain tensors in, plain tensors out; no model objects. Math convention of the
paper: a layer computes X @ W with X [tokens, d], so W_Q is [d, d_h] etc. Every
function works in float64.
"""

from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------- Type I (MLP)
def ridge_leverage_scores(C: torch.Tensor, lam: float) -> torch.Tensor:
    """s_i = [C (C + λI)^-1]_ii (Algorithm 1, line 2).

    With C + λI = L Lᵀ (Cholesky): s = diag(L^-ᵀ L^-1 C) = Σ_k (L^-1)_ki (L^-1 C)_ki. Two
    triangular solves instead of an eigendecomposition (MKL's float64 eigh takes ~20 s at
    d_int = 1536 on the 2-core AMD CI machine, Cholesky ~0.3 s).
    """
    n = C.shape[0]
    L = torch.linalg.cholesky(C + lam * torch.eye(n, dtype=C.dtype, device=C.device))
    L_inv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=C.dtype, device=C.device), upper=False)
    return (L_inv * (L_inv @ C)).sum(0)


def psd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A⁺ B for a symmetric PSD A: Cholesky when A is positive definite, the pseudo-inverse otherwise."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.pinv(A, hermitian=True) @ B


def nystrom_scores(C_sigma: torch.Tensor, ridge: float = 1.0, relative: bool = True) -> torch.Tensor:
    """The ridge leverage scores Nyström ranks the MLP channels by, with λ = ridge · mean(diag C) when
    `relative` (the scale of C grows with the token count, so an absolute λ = 1 means nearly no ridge on a
    large calibration set)."""
    lam = ridge * C_sigma.diagonal().mean().item() if relative else ridge
    return ridge_leverage_scores(C_sigma, lam)


def nystrom_mlp(
    C_sigma: torch.Tensor,
    W_down: torch.Tensor,
    k: int,
    ridge: float = 1.0,
    relative: bool = True,
    scores: torch.Tensor | None = None,
):
    """Type-I compression by Nyström approximation (Algorithm 1, Theorem 1).

    C_sigma: [d_int, d_int] correlation of the MLP activations h = act(x W_gate) ⊙ (x W_up);
    W_down: [d_int, d]; λ as in `nystrom_scores`. `scores`: those scores, when already computed
    for this C (they do not depend on k).
    Returns (idx [k] sorted kept channels, W_down' = (SᵀCS)⁺ SᵀC W_down [k, d]).
    """
    d_int = C_sigma.shape[0]
    if not 1 <= k <= d_int:
        raise ValueError(f"k={k} outside [1, {d_int}]")
    if k == d_int:
        return torch.arange(d_int, device=C_sigma.device), W_down.clone()
    if scores is None:
        scores = nystrom_scores(C_sigma, ridge, relative)
    idx = torch.topk(scores, k).indices.sort().values
    C_ss = C_sigma[idx][:, idx]
    W_new = psd_solve(C_ss, C_sigma[idx] @ W_down)
    return idx, W_new


# --------------------------------------------------------- Type II (key-query)
def pair_energy(W: torch.Tensor, C: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Energy of each rotary pair of each head: Σ_tokens (q_i² + q_{i+h/2}²) = diag(Wᵀ C W) summed per pair.

    W: [d, n_heads·head_dim]; C: [d, d] input correlation. Returns [n_heads, head_dim/2].
    RoPE rotates each pair, so the pair energy is the same before and after RoPE.
    """
    diag = ((C @ W) * W).sum(0)  # diag(Wᵀ C W) without forming it
    per_head = diag.view(-1, head_dim)
    half = head_dim // 2
    return per_head[:, :half] + per_head[:, half:]


def cr_key_query(energy_q: torch.Tensor, energy_k: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Type-II compression by CR decomposition over whole rotary pairs (Algorithm 2, GQA as in B.1).

    energy_q: [H, head_dim/2], energy_k: [H_kv, head_dim/2] pair energies (‖C^{1/2}[:, i]‖² = C_ii,
    so no matrix square root is needed). The score of pair p in KV group g is
    sqrt(Σ_{h∈g} E_Q[h,p]·E_K[g,p]) — the paper's group score. Selecting whole pairs makes the
    selection commute with RoPE exactly. Returns freq_idx [H_kv, n_pairs] sorted per group.
    """
    H, half = energy_q.shape
    H_kv = energy_k.shape[0]
    if not 1 <= n_pairs <= half:
        raise ValueError(f"n_pairs={n_pairs} outside [1, {half}]")
    group_q = energy_q.view(H_kv, H // H_kv, half)
    scores = (group_q * energy_k[:, None, :]).sum(1).clamp(min=0).sqrt()
    return torch.topk(scores, n_pairs, dim=1).indices.sort(dim=1).values


def pair_dims(freq_idx_row: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head dimensions of the kept pairs, in the reduced layout [first halves | second halves]."""
    return torch.cat([freq_idx_row, freq_idx_row + head_dim // 2])


# ---------------------------------------------------------- Type III (value-output)
def svd_value_output(C: torch.Tensor, W_v: torch.Tensor, W_os: list[torch.Tensor], k: int, method: str = "stacked"):
    """Type-III compression by SVD (Algorithm 3, Theorem 3) for one value head and the output
    heads that read it (one for MHA, the G query heads of a KV group for GQA).

    C: [d, d] input correlation; W_v: [d, d_h]; W_os: G × [d_h, d]; k: kept rank.
    'stacked' (default): the exact optimum of Σ_j ‖C^{1/2}(W_v W_o,j − Ŵ_v Ŵ_o,j)‖²: the
    rank-k SVD of C^{1/2} W_v [W_o,1 … W_o,G]. With G = C^{1/2} W_v = U Σ Vᵀ (from the
    eigendecomposition of the small W_vᵀ C W_v) and Σ Vᵀ W_stack = U' Σ' V'ᵀ:
    Ŵ_v = W_v V Σ⁺ U'_k, Ŵ_o = U'_kᵀ Σ Vᵀ W_stack. No d×d square root or inverse is formed.
    'b1': the paper's GQA heuristic (B.1): project onto the top-k right singular vectors of
    C^{1/2} W_v, Ŵ_v = W_v V_k, Ŵ_o,j = V_kᵀ W_o,j.
    Returns (Ŵ_v [d, k], [Ŵ_o,j [k, d]]).
    """
    d_h = W_v.shape[1]
    if not 1 <= k <= d_h:
        raise ValueError(f"k={k} outside [1, {d_h}]")
    evals, V = torch.linalg.eigh(W_v.T @ C @ W_v)  # ascending
    evals, V = evals.flip(0).clamp(min=0), V.flip(1)
    if method == "b1":
        Vk = V[:, :k]
        return W_v @ Vk, [Vk.T @ W_o for W_o in W_os]
    if method != "stacked":
        raise ValueError(f"unknown value-output method {method!r} (stacked, b1)")
    sigma = evals.sqrt()
    keep = sigma > sigma[0] * 1e-10 if sigma[0] > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    sigma_pinv = torch.where(keep, 1.0 / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(sigma))
    W_stack = torch.cat(W_os, dim=1)  # [d_h, G·d]
    M = sigma[:, None] * (V.T @ W_stack)  # Σ Vᵀ W_stack
    U2, _, _ = torch.linalg.svd(M, full_matrices=False)
    U2k = U2[:, :k]
    W_v_new = W_v @ (V * sigma_pinv[None, :]) @ U2k
    W_o_new = U2k.T @ M
    return W_v_new, list(W_o_new.split(W_os[0].shape[1], dim=1))


# ------------------------------------------------------------------ allocation
def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """Σ_tokens (1 − cos(x_in, x_out)) and the token count (Section 3.3, Men et al. 2024)."""
    cos = torch.nn.functional.cosine_similarity(x_in.flatten(0, -2), x_out.flatten(0, -2), dim=-1)
    return (1 - cos.double()).sum().item(), cos.numel()


def _scaled(scores, weights, params, target, eps, cap):
    logits = -weights * scores / eps
    base = torch.softmax(logits - logits.max(), 0)
    phi = torch.zeros_like(base)
    free = torch.ones_like(base, dtype=torch.bool)
    budget = target * params.sum()
    for _ in range(len(base) + 1):  # clip at the cap and hand the excess to the others
        rest = budget - (params * phi * ~free).sum()
        denom = (params * base * free).sum()
        if not denom > 0:  # every uncapped entry's softmax weight underflowed
            raise ValueError(f"allocation temperature eps={eps:g} is too small for these scores; use a larger one")
        phi = torch.where(free, base * rest / denom, phi)
        over = free & (phi > cap)
        if not over.any():
            break
        phi[over] = cap
        free &= ~over
    return phi


def allocate_sparsity(
    scores,
    target: float,
    eps: float | None = None,
    max_sparsity: float = 0.8,
    weights=None,
    params=None,
    cap: float = 0.95,
):
    """Global sparsity allocation φ = c · softmax(−w ⊙ s / ε) (eq. 11; eq. 43 for the B.11 split).

    scores: importance per entry (layer, or layer×module for the split); weights: w of eq. 43
    (ones for eq. 11); params: parameters per entry, so the parameter-weighted mean of φ is
    `target` (eq. 10's constraint when all entries are equal). φ ≤ cap, the excess is spread
    over the rest. eps=None picks ε so that the largest φ is `max_sparsity` (the paper's rule of
    thumb, B.2); if even a uniform allocation exceeds it, the allocation is uniform.
    Returns (φ, ε used; inf for uniform).
    """
    s = torch.as_tensor(scores, dtype=torch.float64, device="cpu")
    w = torch.ones_like(s) if weights is None else torch.as_tensor(weights, dtype=torch.float64, device="cpu")
    p = torch.ones_like(s) if params is None else torch.as_tensor(params, dtype=torch.float64, device="cpu")
    if not 0 <= target < cap:
        raise ValueError(f"target sparsity {target} outside [0, {cap})")
    if target == 0:
        return torch.zeros_like(s), math.inf
    if eps is not None:
        return _scaled(s, w, p, target, eps, cap), eps
    if target >= max_sparsity or torch.allclose(w * s, (w * s)[0].expand_as(s)):
        return torch.full_like(s, target), math.inf
    lo, hi = math.log(1e-5), math.log(1e4)  # max φ decreases as ε grows
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        try:
            too_sharp = _scaled(s, w, p, target, math.exp(mid), cap).max() > max_sparsity
        except ValueError:  # so small an ε that the softmax underflowed
            too_sharp = True
        if too_sharp:
            lo = mid
        else:
            hi = mid
    eps = math.exp(hi)
    return _scaled(s, w, p, target, eps, cap), eps


def _lower_hull(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (monotone chain), collinear points dropped."""
    hull: list[tuple[float, float]] = []
    for p in zip(xs, ys):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_by_cost(levels, costs, params, target: float, cap: float) -> torch.Tensor:
    """Sparsity per entry minimising Σ_e cost_e(φ_e) subject to Σ_e params_e·φ_e = target·Σ params
    and 0 ≤ φ_e ≤ cap.

    levels: [K] increasing sparsities at which the costs were measured; costs: [E, K] the measured
    cost of each entry (e.g. the KL divergence of the logits when only that module is compressed);
    cost_e(0) = 0. Each curve is made non-decreasing, cut at `cap` (linear interpolation) and
    replaced by its lower convex hull; over convex piecewise-linear curves, taking the segments of
    all entries cheapest-per-parameter first is the exact optimum. Returns φ [E] (float64).
    """
    lv = [float(x) for x in levels]
    c = torch.as_tensor(costs, dtype=torch.float64, device="cpu")
    p = torch.as_tensor(params, dtype=torch.float64, device="cpu")
    if c.dim() != 2 or c.shape[1] != len(lv) or p.shape != (c.shape[0],):
        raise ValueError(f"costs must be [entries, {len(lv)}] with one parameter count per entry")
    if any(b <= a for a, b in zip([0.0] + lv, lv)):
        raise ValueError(f"levels must be positive and increasing, got {lv}")
    if not 0 <= target <= cap:
        raise ValueError(f"target sparsity {target} outside [0, cap={cap}]")
    if target > 0 and cap > lv[-1]:
        raise ValueError(f"cap {cap} beyond the last measured level {lv[-1]}")
    segments = []  # (cost per parameter removed, entry, sparsity from, to)
    for e in range(c.shape[0]):
        xs, ys = [0.0], [0.0]
        for x, y in zip(lv, c[e].tolist()):
            y = max(y, ys[-1])
            if x >= cap:
                if cap > xs[-1]:
                    ys.append(ys[-1] + (y - ys[-1]) * (cap - xs[-1]) / (x - xs[-1]))
                    xs.append(cap)
                break
            xs.append(x)
            ys.append(y)
        hull = _lower_hull(xs, ys)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
            segments.append(((y1 - y0) / ((x1 - x0) * float(p[e])), e, x0, x1))
    segments.sort(key=lambda s: (s[0], s[2]))
    phi = torch.zeros(c.shape[0], dtype=torch.float64, device="cpu")
    left = target * float(p.sum())
    for _, e, x0, x1 in segments:
        if left <= 0:
            break
        take = min(left, (x1 - x0) * float(p[e]))
        phi[e] = x0 + take / float(p[e])
        left -= take
    if left > 1e-9 * float(p.sum()):
        raise ValueError(f"target sparsity {target} needs more than the cap {cap} allows")
    return phi


def refine_costs(levels, costs, step: float = 0.01):
    """Measured cost curves on a fine grid of sparsities (`step` apart, up to the last level).

    Between measured points the curve is a power law (log-log linear); below the first level it
    follows the first segment's exponent (at least 1), so cost(0) = 0. Without this the allocation
    could only pick the measured levels (the lower hull of a piecewise-linear curve has its corners
    there). Costs ≤ 0 (noise around zero) are raised to a tiny positive value first.
    Returns (fine levels [K'], fine costs [E, K']).
    """
    lv = torch.as_tensor([float(x) for x in levels], dtype=torch.float64, device="cpu")
    c = torch.as_tensor(costs, dtype=torch.float64, device="cpu")
    floor = max(float(c.abs().max()) * 1e-9, 1e-300)
    c = c.clamp_min(floor).cummax(1).values  # positive and non-decreasing
    n = int(round(float(lv[-1]) / step))
    fine = torch.arange(1, n + 1, dtype=torch.float64, device="cpu") * (float(lv[-1]) / n)
    log_lv, log_c = lv.log(), c.log()
    # exponents of each measured segment; the first one also serves [0, levels[0]]
    p = (log_c[:, 1:] - log_c[:, :-1]) / (log_lv[1:] - log_lv[:-1])
    p0 = p[:, :1].clamp_min(1.0) if p.shape[1] else torch.ones(c.shape[0], 1, dtype=torch.float64, device="cpu")
    seg = torch.searchsorted(lv, fine, right=False).clamp(max=len(lv) - 1)  # first level >= x
    out = torch.empty(c.shape[0], len(fine), dtype=torch.float64, device="cpu")
    lx = fine.log()
    below = seg == 0
    out[:, below] = (log_c[:, :1] + p0 * (lx[below] - log_lv[0])).exp()
    if (~below).any():
        j = seg[~below]
        t = (lx[~below] - log_lv[j - 1]) / (log_lv[j] - log_lv[j - 1])
        out[:, ~below] = (log_c[:, j - 1] + t * (log_c[:, j] - log_c[:, j - 1])).exp()
    return fine, out
