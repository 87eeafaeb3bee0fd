"""MoDeGPT end to end: calibration activations flow through the model layer by layer;
each layer is compressed on inputs produced by the already-compressed layers before it.

Statistics: per micro-batch correlation matrices are float32 matrix products (fast on
CPU), summed across micro-batches in float64; all decompositions run in float64.
`compute_dtype` bfloat16 runs the passes' products and attention in bfloat16 (autocast) and
multiplies Nyström's channel statistics in it too; the streams, the other statistics and
every solve keep their precision.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from modegpt_rt.compressor.algorithms import (
    allocate_by_cost,
    allocate_sparsity,
    block_influence,
    cr_key_query,
    nystrom_mlp,
    nystrom_scores,
    pair_dims,
    pair_energy,
    psd_solve,
    refine_costs,
    svd_value_output,
)
from modegpt_rt.compressor.widths import Multiples, widths_for_sparsity
from tqdm.auto import tqdm

from modegpt_rt.config import LayerWidths, ModelConfig
from modegpt_rt.model import Layer, Model, linear, rms_norm

MAX_RATE = 0.95


@dataclass
class CompressOptions:
    rate: float
    allocation: str = "global"  # global | uniform | sensitivity
    split: bool = False  # B.11: separate MLP / attention sparsities from per-module scores
    attn_ratio: float = 1.0  # attention sparsity = attn_ratio × MLP sparsity in each layer (layer budget kept)
    eps: float | None = None  # allocation temperature; None: max layer sparsity ≈ max_layer_sparsity
    max_layer_sparsity: float = 0.8
    ridge: float = 1.0  # Nyström ridge λ, relative to mean(diag C_σ)
    ridge_relative: bool = True
    value_method: str = "stacked"  # stacked | b1
    multiples: Multiples = field(default_factory=Multiples)
    bi_samples: int = 8  # calibration samples used for the Block Influence scores
    refit: str = "all"  # none | mlp | all: least-squares refit of down (and output) projections to the dense stream
    refit_samples: int = 32  # calibration windows that carry the dense stream for the refit (0: all)
    refit_prior: float = 0.0  # refit ridge toward the local (Nyström / SVD) solution, × mean(diag Gram)
    probe_tokens: int = 1024  # sensitivity allocation: tokens whose logits measure each trial compression
    sensitivity_from: str | None = None  # sensitivity allocation: reuse this earlier run's table
    micro_batch: int = 4
    compute_dtype: str = "float32"  # float32 | bfloat16 | auto: the calibration passes' matrix products

    @classmethod
    def from_args(cls, args) -> CompressOptions:
        """From parsed command-line arguments (`modegpt compress`, bench/experiment.py)."""
        return cls(
            rate=args.rate,
            allocation=args.allocation,
            split=args.split,
            attn_ratio=getattr(args, "attn_ratio", 1.0),
            eps=args.eps,
            max_layer_sparsity=args.max_layer_sparsity,
            ridge=args.ridge,
            ridge_relative=not args.absolute_ridge,
            value_method=args.value_method,
            multiples=Multiples.parse(args.multiples),
            bi_samples=args.bi_samples,
            refit=getattr(args, "refit", "all"),
            refit_samples=getattr(args, "refit_samples", 32),
            refit_prior=getattr(args, "refit_prior", 0.0),
            probe_tokens=getattr(args, "probe_tokens", 1024),
            sensitivity_from=getattr(args, "sensitivity_from", None),
            compute_dtype=getattr(args, "compute_dtype", "float32"),
        )

    def validate(self):
        if not 0.0 <= self.rate < MAX_RATE:
            raise ValueError(f"rate {self.rate} outside [0, {MAX_RATE})")
        if self.eps is not None and not 0 < self.eps < math.inf:
            raise ValueError(f"allocation temperature eps must be a positive number, got {self.eps}")
        if not 0.0 < self.max_layer_sparsity < MAX_RATE:
            raise ValueError(f"max layer sparsity must be in (0, {MAX_RATE}), got {self.max_layer_sparsity}")
        if self.bi_samples < 1:
            raise ValueError(f"--bi-samples must be >= 1, got {self.bi_samples}")
        if self.micro_batch < 1:
            raise ValueError(f"micro batch must be >= 1, got {self.micro_batch}")
        if self.allocation not in ("global", "uniform", "sensitivity"):
            raise ValueError(f"allocation {self.allocation!r}: choose global, uniform or sensitivity")
        if self.allocation == "sensitivity" and (self.split or self.attn_ratio != 1.0):
            raise ValueError(
                "the sensitivity allocation sets attention and MLP sparsities itself; drop --split / --attn-ratio"
            )
        if self.allocation == "uniform" and (self.split or self.eps is not None):
            raise ValueError("the uniform allocation gives every layer the same sparsity; drop --split / --eps")
        if self.sensitivity_from and self.allocation != "sensitivity":
            raise ValueError("--sensitivity-from needs --allocation sensitivity")
        if self.probe_tokens < 16:
            raise ValueError(f"probe tokens must be >= 16, got {self.probe_tokens}")
        if self.value_method not in ("stacked", "b1"):
            raise ValueError(f"value method {self.value_method!r}: choose stacked or b1")
        if self.refit not in ("none", "mlp", "all"):
            raise ValueError(f"refit {self.refit!r}: choose none, mlp or all")
        if self.refit_samples < 0:
            raise ValueError(f"refit samples must be >= 0 (0 = all), got {self.refit_samples}")
        if not 0.0 <= self.refit_prior < math.inf:
            raise ValueError(f"refit prior must be a finite number >= 0, got {self.refit_prior}")
        if not 0 < self.ridge < math.inf:
            raise ValueError(f"ridge λ must be a positive finite number, got {self.ridge}")
        if not 0.0 <= self.attn_ratio <= 10.0:
            raise ValueError(f"attention ratio must be in [0, 10], got {self.attn_ratio}")
        if self.compute_dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"compute dtype {self.compute_dtype!r}: choose float32, bfloat16 or auto")
        if self.split and self.attn_ratio != 1.0:
            raise ValueError("--split chooses the MLP/attention sparsities itself; drop --attn-ratio")


def compute_dtype(opts: CompressOptions, device) -> torch.dtype:
    """The dtype of the calibration passes' matrix products; `auto`: bfloat16 on a CPU (AVX512-BF16 / AMX) or
    GPU that multiplies it natively, else float32."""
    if opts.compute_dtype == "auto":
        from modegpt_rt.kernels import has_native_bfloat16

        return torch.bfloat16 if has_native_bfloat16(device) else torch.float32
    return getattr(torch, opts.compute_dtype)


def _products_in(dtype: torch.dtype, device) -> contextlib.AbstractContextManager:
    """Autocast the forward passes' linear layers and attention to `dtype` (weights and the residual streams
    stay float32; the statistics are gathered in float32 and summed in float64, see `_Stats`)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _check_float32(model: Model):
    if model.dtype != torch.float32 or model.weight_dtype != torch.float32:
        raise ValueError("compress a float32 model (statistics are gathered from float32 activations)")


@torch.no_grad()
def block_influence_scores(model: Model, tokens: torch.Tensor, micro_batch: int, dtype=torch.float32, on_device=None):
    """Per layer: BI of the whole layer, of its attention sub-block and of its MLP sub-block
    (`dtype`: the products' dtype, see `_products_in`; `on_device(layer)`: a context that holds an offloaded
    layer where the model computes, see `_offloaded`). Layer by layer over every window, so each layer is used
    once."""
    _check_float32(model)
    L = len(model.layers)
    acc = torch.zeros(3, L, dtype=torch.float64, device="cpu")  # host-side sums of Python floats
    eps = model.config.rms_norm_eps
    tokens = tokens.to(model.device)
    mbs = list(_batches(tokens.shape[0], micro_batch))
    hs = [torch.nn.functional.embedding(tokens[sl], model.embed) for sl in mbs]
    for i, layer in enumerate(model.layers):
        with on_device(layer) if on_device else contextlib.nullcontext():
            for m, h in enumerate(hs):
                with _products_in(dtype, h.device):
                    mid = h + model.attention_block(layer, h)
                    out = mid + layer.mlp(rms_norm(mid, layer.mlp_norm, eps))
                for j, (a, b) in enumerate(((h, out), (h, mid), (mid, out))):
                    acc[j, i] += block_influence(a, b)[0]
                hs[m] = out
    layer_s, attn_s, mlp_s = acc / tokens.numel()
    return layer_s, attn_s, mlp_s


def split_layer_sparsity(phi, ratio: float, attn_params: int, mlp_params: int):
    """Per-layer sparsities -> (attention, MLP) sparsities with attention = ratio × MLP and the same
    parameters removed from each layer: φ·(P_attn + P_mlp) = ratio·φ_mlp·P_attn + φ_mlp·P_mlp."""
    if ratio == 1.0:  # the paper's equal sparsities, bit for bit
        return [float(p) for p in phi], [float(p) for p in phi]
    mlp = [float(p) * (attn_params + mlp_params) / (ratio * attn_params + mlp_params) for p in phi]
    attn = [ratio * m for m in mlp]
    if max(mlp + attn, default=0.0) > MAX_RATE:
        raise ValueError(
            f"attention ratio {ratio} needs a module sparsity of {max(mlp + attn):.2f} (> {MAX_RATE}) in some layer;"
            " choose a ratio closer to 1 or a lower rate / max layer sparsity"
        )
    return attn, mlp


def module_params(cfg: ModelConfig) -> tuple[int, int]:
    """(attention, MLP) projection parameters of one dense layer."""
    mlp_p = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.dense().layer_params(0) - mlp_p, mlp_p


def plan_sparsity(model: Model, tokens: torch.Tensor, opts: CompressOptions, progress: bool = False, on_device=None):
    """Per-layer (attention sparsity, MLP sparsity) and what the allocation found (`on_device`: see
    `block_influence_scores`)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    info = {"allocation": opts.allocation, "split": opts.split, "attn_ratio": opts.attn_ratio}
    attn_p, mlp_p = module_params(cfg)
    if opts.allocation == "uniform" or opts.rate == 0:
        return (*split_layer_sparsity([opts.rate] * L, opts.attn_ratio, attn_p, mlp_p), {**info, "eps": None})
    if opts.allocation == "sensitivity":
        attn, mlp, found = sensitivity_allocation(model, tokens, opts, progress)
        return attn, mlp, {**info, **found, "eps": None}
    bi = tokens[: opts.bi_samples]
    dtype = compute_dtype(opts, model.device)
    layer_s, attn_s, mlp_s = block_influence_scores(model, bi, opts.micro_batch, dtype, on_device)
    info.update(bi_samples=int(bi.shape[0]), bi_layer=layer_s.tolist(), bi_attn=attn_s.tolist(), bi_mlp=mlp_s.tolist())
    if not opts.split:
        phi, eps = allocate_sparsity(layer_s, opts.rate, opts.eps, opts.max_layer_sparsity)
        return (*split_layer_sparsity(phi.tolist(), opts.attn_ratio, attn_p, mlp_p), {**info, "eps": eps})
    # B.11: one entry per (layer, module); w of eq. 43 ∝ the module's parameter share (2:1 in LLaMA-2 7B)
    scores = torch.cat([attn_s, mlp_s])
    params = torch.tensor([attn_p] * L + [mlp_p] * L, dtype=torch.float64, device="cpu")
    weights = params / params.mean()
    phi, eps = allocate_sparsity(scores, opts.rate, opts.eps, opts.max_layer_sparsity, weights=weights, params=params)
    return phi[:L].tolist(), phi[L:].tolist(), {**info, "eps": eps}


def _indexed(device) -> torch.device:
    """`cuda` as the device it means (`cuda:N`, the current one), so that it compares equal to a model's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def _offloaded(model: Model, device, always: bool = False):
    """Compute on `device` while the layers' weights stay where the model is (offloading): the embedding, the
    final norm, the LM head and the RoPE tables move to `device` for the duration, and the context yields
    `on_device(layer)`, a context that holds one layer there for its turn (and moves it back, compressed
    weights included, after it). With `device` where the model already is, nothing moves (`always`: the same
    schedule of moves anyway, for tests on a machine with one device)."""
    home, device = model.device, _indexed(device)
    if device == home and not always:
        yield lambda layer: contextlib.nullcontext()
        return

    def move_shell(to):  # everything but the layers
        layers = model.layers
        model.layers = torch.nn.ModuleList()
        try:
            model.to(to)
        finally:
            model.layers = layers

    @contextlib.contextmanager
    def on_device(layer):
        try:  # a move that fails half way (out of memory) is undone too
            layer.to(device)
            yield
        finally:
            layer.to(home)

    try:
        move_shell(device)
        yield on_device
    finally:
        move_shell(home)


class _Stats:
    """Correlation Σ xᵀx accumulated in float64 from float32 micro-batch products (bfloat16 inputs, from
    passes computed in it, are widened first; autocast is off inside).

    Only the blocks on and above the diagonal are multiplied (the rest is their mirror):
    with 4 column blocks that is 10/16 of the full product's work.
    `product_dtype=torch.bfloat16` multiplies in bfloat16 instead (inputs rounded to it, sums accumulated in
    float32 inside each product, each micro-batch's block rounded to bfloat16 once): for statistics that only
    rank and project (the Nyström selection's), never for a least-squares Gram.
    """

    def __init__(self, dim, blocks: int = 4, product_dtype: torch.dtype = torch.float32, device="cpu"):
        self.C = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0
        self.product_dtype = product_dtype
        step = -(-dim // blocks)
        self.cuts = [slice(s, min(dim, s + step)) for s in range(0, dim, step)]

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).to(self.product_dtype)
        with torch.autocast(x.device.type, enabled=False):
            for i, a in enumerate(self.cuts):
                for b in self.cuts[i:]:
                    blk = (x[:, a].T @ x[:, b]).double()
                    self.C[a, b] += blk
                    if b != a:
                        self.C[b, a] += blk.T
        self.tokens += x.shape[0]


class _Cross:
    """Cross-correlation Σ aᵀb in float64 from float32 micro-batch products (see `_Stats`)."""

    def __init__(self, m, n, device="cpu"):
        self.C = torch.zeros(m, n, dtype=torch.float64, device=device)

    def add(self, a, b):
        with torch.autocast(a.device.type, enabled=False):
            self.C += (a.reshape(-1, a.shape[-1]).float().T @ b.reshape(-1, b.shape[-1]).float()).double()


def refit_projection(
    gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-6, prior: torch.Tensor | None = None, pull: float = 0.0
) -> torch.Tensor:
    """argmin_W ‖A W − Y‖² + μ‖W − W₀‖² from Gram AᵀA and cross-correlation AᵀY, with a tiny relative ridge
    for rank-deficient A and, when `pull` > 0, μ = pull · mean(diag AᵀA) toward the prior W₀."""
    scale = gram.diagonal().mean().clamp_min(1e-30)
    lam = ridge * scale
    rhs = cross
    if pull > 0 and prior is not None:
        lam = lam + pull * scale
        rhs = cross + pull * scale * prior
    return psd_solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs)


def compress_attention(layer: Layer, C: torch.Tensor, widths: LayerWidths, cfg: ModelConfig, method: str):
    """Type II (q, k) + Type III (v, o) for one layer from its attention-input correlation C."""
    w = {n: t.double() for n, t in layer.split_weights().items()}
    dh, H, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    G = H // Hkv
    Wq, Wk, Wv, Wo = w["self_attn.q_proj"].T, w["self_attn.k_proj"].T, w["self_attn.v_proj"].T, w["self_attn.o_proj"].T
    # Type II: whole rotary pairs, one selection per KV group
    freq_idx = cr_key_query(pair_energy(Wq, C, dh), pair_energy(Wk, C, dh), widths.d_qk // 2)
    q_cols, k_cols = [], []
    for g in range(Hkv):
        dims = pair_dims(freq_idx[g], dh)
        k_cols.append(g * dh + dims)
        q_cols += [(g * G + j) * dh + dims for j in range(G)]
    new = dict(w)
    new["self_attn.q_proj"] = Wq[:, torch.cat(q_cols)].T
    new["self_attn.k_proj"] = Wk[:, torch.cat(k_cols)].T
    # Type III: value head of each group with the output heads that read it
    v_parts, o_parts = [], [None] * H
    for g in range(Hkv):
        heads = range(g * G, (g + 1) * G)
        Wv_g = Wv[:, g * dh : (g + 1) * dh]
        Wo_g = [Wo[j * dh : (j + 1) * dh] for j in heads]
        Wv_new, Wo_new = svd_value_output(C, Wv_g, Wo_g, widths.d_v, method)
        v_parts.append(Wv_new)
        for j, Wo_j in zip(heads, Wo_new):
            o_parts[j] = Wo_j
    new["self_attn.v_proj"] = torch.cat(v_parts, dim=1).T
    new["self_attn.o_proj"] = torch.cat(o_parts, dim=0).T
    return new, freq_idx


def compress_mlp(layer: Layer, C_sigma: torch.Tensor, k: int, ridge: float, relative: bool, scores=None):
    w = {n: t.double() for n, t in layer.split_weights().items()}
    idx, W_down = nystrom_mlp(C_sigma, w["mlp.down_proj"].T, k, ridge, relative, scores)
    w["mlp.gate_proj"] = w["mlp.gate_proj"][idx]
    w["mlp.up_proj"] = w["mlp.up_proj"][idx]
    w["mlp.down_proj"] = W_down.T
    return w, idx


SENSITIVITY_LEVELS = (0.2, 0.4, 0.6, 0.8)


def trial_layer(
    layer: Layer, cfg: ModelConfig, module: str, sparsity: float, C_attn, C_sigma, opts: CompressOptions, scores=None
):
    """A copy of a dense `layer` with one module ("attn" or "mlp") compressed to `sparsity` by the
    local MoDeGPT step (no refit); `scores`: the layer's `nystrom_scores`, shared by its MLP trials."""
    trial = copy.deepcopy(layer)
    if module == "attn":
        pairs = max(1, round((1 - sparsity) * cfg.head_dim / 2))
        w = LayerWidths(cfg.intermediate_size, 2 * pairs, max(1, round((1 - sparsity) * cfg.head_dim)))
        new, freq_idx = compress_attention(trial, C_attn, w, cfg, opts.value_method)
    else:
        w = LayerWidths(max(1, round((1 - sparsity) * cfg.intermediate_size)), cfg.head_dim, cfg.head_dim)
        new, _ = compress_mlp(trial, C_sigma, w.k_mlp, opts.ridge, opts.ridge_relative, scores)
        freq_idx = trial.freq_idx
    trial.load_weights(cfg, w, new, freq_idx)
    return trial


def _warn_small_calibration(tokens: torch.Tensor, opts: CompressOptions, width: int):
    """Fewer calibration tokens than the MLP is wide leave its correlation (and the refit's least squares)
    rank-deficient: the fits then go wrong by orders of magnitude (a review measured a WikiText-2 perplexity of
    5.8e9 after a refit on 1,024 tokens of SmolLM2, whose MLP is 1,536 wide). Warn, naming the fix."""
    n, T = tokens.shape
    have = {"calibration": n * T}
    if opts.refit != "none":
        have["refit"] = min(n, opts.refit_samples or n) * T
    short = {k: v for k, v in have.items() if v < 4 * width}
    if short:
        what = " and ".join(f"{v:,} {k}" for k, v in short.items())
        warnings.warn(
            f"only {what} tokens for MLPs {width:,} wide (want at least {4 * width:,}): the fits are nearly "
            "underdetermined and the model may come out broken; raise --samples / --seqlen (or --refit-samples)",
            stacklevel=4,  # the caller of compress (under torch.no_grad's wrapper)
        )


def kl_to(model: Model, h_ref: torch.Tensor):
    """A function of final hidden states h (shaped like `h_ref`) giving the mean KL divergence of their
    next-token distributions q from those p of `h_ref`.

    Per token KL(p‖q) = Σ p log p − Σ p·z + logsumexp(z) for the logits z = n(h) Wᵀ (Σ p = 1), and
    Σ_v p_v z_v = n(h)·(p W). With p W and Σ p log p computed once, each call needs only the logits'
    logsumexp: no log-softmax and no product with p over the probe × vocabulary logits."""
    eps = model.config.rms_norm_eps
    # the reference side in float64, once: float32 probabilities miss Σ p = 1 by ~2e-5 on SmolLM2, which
    # biased every KL by −1.3e-4 (a tenth of the smallest costs measured)
    head = model.lm_head.double()
    ref = torch.log_softmax(rms_norm(h_ref.double(), model.norm.double(), eps) @ head.T, -1)
    ref_p = ref.exp()
    neg_entropy = (ref_p * ref).sum(-1)
    p_head = ref_p @ head  # [..., d]
    del ref, ref_p, head

    def kl(h: torch.Tensor) -> float:
        normed = rms_norm(h, model.norm, eps).reshape(-1, h.shape[-1])
        # 128 tokens' logits at a time stay in cache between the product and the logsumexp (0.39 s against
        # 0.48 s for SmolLM2's 1024 × 49,152 on this CPU)
        lse = torch.cat(
            [torch.logsumexp(linear(normed[s : s + 128], model.lm_head), -1) for s in range(0, len(normed), 128)]
        )
        dot = (normed.double() * p_head.reshape(normed.shape)).sum(-1)
        return float((neg_entropy.reshape(-1) - dot + lse.double()).mean())

    return kl


@torch.no_grad()
def measure_sensitivity(model: Model, tokens: torch.Tensor, opts: CompressOptions, progress: bool = True) -> dict:
    """Every module of every layer compressed alone, on dense inputs, to each of SENSITIVITY_LEVELS; its
    cost is the KL divergence of the model's next-token distribution from the dense one, averaged over a
    probe of `opts.probe_tokens` calibration tokens. Statistics come from the first `opts.bi_samples`
    windows. Returns {"levels", "attn_kl" [L][K], "mlp_kl" [L][K], ...} (a compress report keeps it)."""
    _check_float32(model)
    cfg, eps, L = model.config, model.config.rms_norm_eps, model.config.num_hidden_layers
    n_probe = max(1, min(tokens.shape[0], opts.probe_tokens // tokens.shape[1]))
    dev = model.device
    tokens = tokens.to(dev)
    probe = tokens[:n_probe, : min(tokens.shape[1], opts.probe_tokens)]
    stats = tokens[: opts.bi_samples]
    # every layer's statistics, kept in host memory until its trials (float64: 35 GB for LLaMA-2-7B's 32 layers)
    C_attn, C_sigma = [], []
    hs = [torch.nn.functional.embedding(stats[sl], model.embed) for sl in _batches(stats.shape[0], opts.micro_batch)]
    for layer in model.layers:
        attn_stats, mlp_stats = _Stats(cfg.hidden_size, device=dev), _Stats(cfg.intermediate_size, device=dev)
        for m, h in enumerate(hs):
            attn_stats.add(rms_norm(h, layer.attn_norm, eps))
            h = h + model.attention_block(layer, h)
            gate_up = torch.nn.functional.linear(rms_norm(h, layer.mlp_norm, eps), layer.w_gate_up)
            act = torch.nn.functional.silu(gate_up[..., : layer.k_mlp]) * gate_up[..., layer.k_mlp :]
            mlp_stats.add(act)
            hs[m] = h + torch.nn.functional.linear(act, layer.w_down)
        C_attn.append(attn_stats.C.cpu())
        C_sigma.append(mlp_stats.C.cpu())
    del hs
    inputs = [torch.nn.functional.embedding(probe, model.embed)]
    for layer in model.layers:
        inputs.append(model.layer_forward(layer, inputs[-1]))
    kl_from_dense = kl_to(model, inputs.pop())

    def kl(i, trial):
        h = model.layer_forward(trial, inputs[i])
        for layer in model.layers[i + 1 :]:
            h = model.layer_forward(layer, h)
        return kl_from_dense(h)

    levels = SENSITIVITY_LEVELS
    costs = torch.zeros(2, L, len(levels), dtype=torch.float64, device="cpu")  # [attn | mlp, layer, level]
    bar = tqdm(range(L), desc="sensitivity", unit="layer", disable=not progress)
    for i in bar:
        C_a, C_s = C_attn[i].to(dev), C_sigma[i].to(dev)
        scores = nystrom_scores(C_s, opts.ridge, opts.ridge_relative)  # the same for every level
        for m, module in enumerate(("attn", "mlp")):
            for j, s in enumerate(levels):
                costs[m, i, j] = kl(i, trial_layer(model.layers[i], cfg, module, s, C_a, C_s, opts, scores))
        del C_a, C_s, scores
    return {
        "levels": list(levels),
        "attn_kl": costs[0].tolist(),
        "mlp_kl": costs[1].tolist(),
        "probe_tokens": int(probe.numel()),
        "stats_windows": int(stats.shape[0]),
    }


def load_sensitivity(path, num_layers: int) -> dict:
    """The sensitivity table of an earlier `--allocation sensitivity` run: a compressed checkpoint folder
    (its config.json), or a JSON file holding it at the top, under "sensitivity" or under "compression"."""
    import json
    from pathlib import Path

    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a sensitivity table from {f}: {exc}") from None
    for key in ("compression", "sensitivity"):
        if isinstance(doc, dict) and isinstance(doc.get(key), dict):
            doc = doc[key]
    try:
        levels = [float(x) for x in doc["levels"]]
        attn, mlp = (torch.tensor(doc[k], dtype=torch.float64, device="cpu") for k in ("attn_kl", "mlp_kl"))
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise ValueError(f"{f}: no sensitivity table (levels, attn_kl, mlp_kl) in it") from None
    if attn.shape != (num_layers, len(levels)) or mlp.shape != attn.shape:
        raise ValueError(
            f"{f}: sensitivity table is for {attn.shape[0]} layers x {len(levels)} levels, the model has {num_layers}"
        )
    if not all(a < b for a, b in zip([0.0] + levels, levels + [1.0])):
        raise ValueError(f"{f}: sensitivity levels must increase strictly inside (0, 1), got {levels}")
    if not (torch.isfinite(attn).all() and torch.isfinite(mlp).all()):
        raise ValueError(f"{f}: sensitivity table holds non-finite costs")
    return {**doc, "from": str(p)}


def sensitivity_allocation(model: Model, tokens: torch.Tensor, opts: CompressOptions, progress: bool = True):
    """Per-layer (attention, MLP) sparsities from measured sensitivities (`measure_sensitivity`, or the
    table of `opts.sensitivity_from`): the curves are refined to a 0.01 grid (`refine_costs`) and
    `allocate_by_cost` spreads the parameter budget (cost additive over modules) with each module
    capped at `opts.max_layer_sparsity`."""
    cfg, L = model.config, model.config.num_hidden_layers
    if opts.sensitivity_from:
        table = load_sensitivity(opts.sensitivity_from, L)
    else:
        table = measure_sensitivity(model, tokens, opts, progress)
    costs = torch.tensor(table["attn_kl"] + table["mlp_kl"], dtype=torch.float64, device="cpu")
    fine, fine_costs = refine_costs(table["levels"], costs)
    attn_p, mlp_p = module_params(cfg)
    params = torch.tensor([attn_p] * L + [mlp_p] * L, dtype=torch.float64, device="cpu")
    cap = min(opts.max_layer_sparsity, float(fine[-1]))
    phi = allocate_by_cost(fine, fine_costs, params, opts.rate, cap)
    return phi[:L].tolist(), phi[L:].tolist(), {"sensitivity": {**table, "module_cap": cap}}


@torch.no_grad()
def compress(
    model: Model,
    tokens: torch.Tensor,
    opts: CompressOptions,
    progress: bool = True,
    calibration: dict | None = None,
    device=None,
    plan_only: bool = False,
) -> dict:
    """Compress `model` in place with MoDeGPT on calibration `tokens` [N, L]; returns a report.

    `device`: where the passes, statistics and decompositions run (default: where the model is). A model on
    the CPU compressed with a GPU `device` is offloaded: its layers stay in CPU memory and each one moves to the
    GPU for its turn only (`_offloaded`), so the GPU holds one layer's weights beside the activations.
    `plan_only`: stop after the allocation and leave the model as it was; the report (`"plan": true`) then holds
    each layer's widths (`"widths"`) and the rates they remove, the ones a compression with the same options and
    calibration would give, and a sensitivity allocation's table, which `sensitivity_from` accepts."""
    opts.validate()
    _check_float32(model)
    if not model.config.is_dense:
        raise ValueError("the model is already compressed; compress the dense source model instead")
    target = model.device if device is None else _indexed(device)
    offload = target != model.device
    if offload and opts.allocation == "sensitivity" and not opts.sensitivity_from:
        raise ValueError(
            "--allocation sensitivity runs the rest of the model for each of its trials; measure it with the "
            "model on the compute device (no --offload), or reuse a table with --sensitivity-from"
        )
    with _offloaded(model, target) as on_device:
        return _compress(model, tokens, opts, progress, calibration, on_device, offload, plan_only)


def _rates(dense: ModelConfig, widths: list[LayerWidths]) -> dict:
    """What the widths remove from `dense`, as the report counts it."""
    L = dense.num_hidden_layers
    new = dense.with_layers(widths)
    return {
        "achieved_rate": 1 - sum(map(new.layer_params, range(L))) / sum(map(dense.layer_params, range(L))),
        "rate_counts": "fraction of the transformer-block projection parameters removed (norms, embeddings excluded)",
        "removed_block_params": 1 - new.block_params() / dense.block_params(),
        "removed_model_params": 1 - new.total_params() / dense.total_params(),
        "params_dense": dense.total_params(),
        "params_compressed": new.total_params(),
    }


def _compress(
    model: Model, tokens, opts: CompressOptions, progress, calibration, on_device, offload: bool, plan_only=False
) -> dict:
    t0 = time.time()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    cfg = model.config
    eps = cfg.rms_norm_eps
    if tokens.dim() != 2 or tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"calibration must be [windows, tokens] with windows of at most the model's context of "
            f"{cfg.max_position_embeddings} tokens, got {list(tokens.shape)}"
        )
    _warn_small_calibration(tokens, opts, cfg.intermediate_size)
    attn_phi, mlp_phi, alloc = plan_sparsity(model, tokens, opts, progress, on_device)
    widths = widths_for_sparsity(cfg, attn_phi, mlp_phi, opts.multiples)
    t_alloc = time.time() - t0
    dtype = compute_dtype(opts, model.device)
    allocation = {
        "allocation": alloc["allocation"],
        "split_mlp_attention": opts.split,
        "attn_ratio": opts.attn_ratio,
        "eps": None if alloc.get("eps") in (None, math.inf) else alloc["eps"],
        "max_layer_sparsity": opts.max_layer_sparsity,
        "multiples": asdict(opts.multiples),
        "attn_sparsity": attn_phi,
        "mlp_sparsity": mlp_phi,
        "block_influence": {k: alloc[k] for k in ("bi_layer", "bi_attn", "bi_mlp") if k in alloc},
        "sensitivity": alloc.get("sensitivity"),
        "bi_samples": alloc.get("bi_samples"),
        "calibration": calibration or {"samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1])},
    }
    if plan_only:
        return {
            "method": "modegpt",
            "plan": True,
            "target_rate": opts.rate,
            **_rates(cfg, widths),
            "widths": [asdict(w) for w in widths],
            **allocation,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "allocation_seconds": round(t_alloc, 1),
            "device": str(model.device),
        }

    passes = functools.partial(_products_in, dtype, model.device)  # `with passes():` around forward products
    dev = model.device
    h = torch.nn.functional.embedding(tokens.to(dev), model.embed)  # [N, L, d] float32
    N = h.shape[0]
    # refit: the dense model's residual stream, advanced layer by layer with the dense weights, is the
    # least-squares target of the new output/down projections (they absorb the error of earlier layers).
    # It is carried for the first R windows only; micro-batches never straddle window R.
    R = 0 if opts.refit == "none" else min(N, opts.refit_samples or N)
    hd = h[:R].clone() if R else None
    mb = list(_batches(R, opts.micro_batch)) + [
        slice(s.start + R, s.stop + R) for s in _batches(N - R, opts.micro_batch)
    ]
    fit = [sl.stop <= R for sl in mb]  # micro-batches inside the refit windows
    # until the first compressed module the compressed stream is the dense one: nothing to refit there, and a
    # least-squares refit of weights that are already exact would only add rounding (rate 0 stays exact)
    diverged = False
    bar = tqdm(list(enumerate(model.layers)), desc="compress", unit="layer", disable=not progress)
    for i, layer in bar:
        with on_device(layer):  # an offloaded layer is on the compute device for its turn
            w = widths[i]
            # attention: statistics of the attention input, then Type II + III
            stats = _Stats(cfg.hidden_size, device=dev)
            for sl, f in zip(mb, fit):
                stats.add(rms_norm(h[sl], layer.attn_norm, eps))
                if f:
                    with passes():
                        hd[sl] += model.attention_block(layer, hd[sl])  # dense weights still in place
            if (w.d_qk, w.d_v) != (cfg.head_dim, cfg.head_dim):
                diverged = True
                new, freq_idx = compress_attention(layer, stats.C, w, cfg, opts.value_method)
                layer.load_weights(cfg, LayerWidths(cfg.intermediate_size, w.d_qk, w.d_v), new, freq_idx)
            else:
                layer.set_widths(cfg, LayerWidths(cfg.intermediate_size, w.d_qk, w.d_v))
            del stats
            heads = None  # refit "all": the head outputs, kept so the residual pass below needs no second attention
            if opts.refit == "all" and diverged:
                gram = _Stats(layer.n_head * layer.d_v, device=dev)
                cross = _Cross(layer.n_head * layer.d_v, cfg.hidden_size, device=dev)
                heads = []
                for sl, f in zip(mb, fit):
                    with passes():
                        z = model.attention_heads(layer, h[sl])
                    if f:
                        gram.add(z)
                        cross.add(z, hd[sl] - h[sl])
                    heads.append(z)
                new = {n: t.double() for n, t in layer.split_weights().items()}
                new["self_attn.o_proj"] = refit_projection(
                    gram.C, cross.C, prior=new["self_attn.o_proj"].T, pull=opts.refit_prior
                ).T
                layer.load_weights(cfg, LayerWidths(cfg.intermediate_size, w.d_qk, w.d_v), new, layer.freq_idx)
                del gram, cross
            # residual through the compressed attention; MLP statistics on that input. The activations
            # act(x W_gate) ⊙ (x W_up) are kept: Nyström keeps a subset of their channels, so the compressed
            # MLP's output is just the new down projection of the kept ones (no second gate/up pass).
            compress_k = w.k_mlp != cfg.intermediate_size
            diverged = diverged or compress_k
            refit = bool(R) and diverged
            # Nyström's statistics only rank channels and project, so bfloat16 passes multiply them in bfloat16 too,
            # unless they double as the refit's least-squares Gram (refit on every window)
            stats_dtype = torch.float32 if refit and R == N else dtype
            mstats = _Stats(cfg.intermediate_size, product_dtype=stats_dtype, device=dev) if compress_k else None
            cross = _Cross(cfg.intermediate_size, cfg.hidden_size, device=dev) if refit else None
            acts = []
            for j, (sl, f) in enumerate(zip(mb, fit)):
                with passes():
                    if heads is not None:
                        h[sl] += torch.nn.functional.linear(heads[j], layer.wo)
                        heads[j] = None
                    else:
                        h[sl] += model.attention_block(layer, h[sl])
                    gate_up = torch.nn.functional.linear(rms_norm(h[sl], layer.mlp_norm, eps), layer.w_gate_up)
                    act = torch.nn.functional.silu(gate_up[..., : layer.k_mlp]) * gate_up[..., layer.k_mlp :]
                    del gate_up
                    if f:
                        hd[sl] += layer.mlp(rms_norm(hd[sl], layer.mlp_norm, eps))  # dense MLP on the dense stream
                if mstats is not None:
                    mstats.add(act)
                if f and refit:
                    cross.add(act, hd[sl] - h[sl])
                acts.append(act)
            idx = torch.arange(cfg.intermediate_size, device=dev)
            if compress_k:
                new, idx = compress_mlp(layer, mstats.C, w.k_mlp, opts.ridge, opts.ridge_relative)
            else:
                new = {n: t.double() for n, t in layer.split_weights().items()}
            if refit:
                if mstats is not None and R == N:
                    gram = mstats.C[idx][:, idx]
                else:  # the Gram of the kept channels over the refit windows only
                    g = _Stats(len(idx), device=dev)
                    for act, f in zip(acts, fit):
                        if f:
                            g.add(act[..., idx])
                    gram = g.C
                new["mlp.down_proj"] = refit_projection(
                    gram, cross.C[idx], prior=new["mlp.down_proj"].T, pull=opts.refit_prior
                ).T
            if compress_k or refit:
                layer.load_weights(cfg, w, new, layer.freq_idx)
            del mstats, cross
            for sl, act in zip(mb, acts):
                with passes():
                    h[sl] += torch.nn.functional.linear(act[..., idx] if compress_k else act, layer.w_down)
            del acts
            # what this turn made (the float64 layer, Gram matrices, the last activations) goes before the next
            # layer's turn allocates: under --offload the GPU would otherwise hold two layers' worth of it
            new = gram = g = z = act = idx = None
            bar.set_postfix(k_mlp=w.k_mlp, d_qk=w.d_qk, d_v=w.d_v)

    report = {
        "method": "modegpt",
        "target_rate": opts.rate,
        **_rates(cfg, widths),
        **allocation,
        "ridge_lambda": opts.ridge,
        "ridge_relative_to_mean_diag": opts.ridge_relative,
        "value_method": opts.value_method,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "refit": opts.refit,
        "refit_samples": R or None,
        "refit_prior": opts.refit_prior if R else None,
        "allocation_seconds": round(t_alloc, 1),
        "wall_seconds": round(time.time() - t0, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "device": str(model.device),
        "offload": offload,
        "peak_device_gib": (
            round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2) if model.device.type == "cuda" else None
        ),
    }
    model.config = cfg.with_layers(widths, compression=report)
    return report
