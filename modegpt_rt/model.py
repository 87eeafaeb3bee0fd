"""The runtime model: a LLaMA-family decoder whose every layer has its own widths.

Weights are kept fused per layer (one QKV projection, one gate/up projection) so
the decode loop issues few, large matrix products. The attention op (RoPE with
the gathered cos/sin rows of each KV group's kept frequencies, KV-cache append,
causal attention with narrow value heads) comes from `modegpt_rt.kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modegpt_rt import hugepages, kernels
from modegpt_rt.config import LayerWidths, ModelConfig

# Steps with at most this many new tokens in all run every layer in one C++ call (DecodePlan);
# larger (prefill) steps go op by op with MKL for the wide products. 0 disables the plan.
DECODE_PLAN_MAX_ROWS = 16

# HF-style names of one layer's tensors, relative to `model.layers.N.`
PROJ_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NORM_NAMES = ("input_layernorm", "post_attention_layernorm")
ROPE_IDX_NAME = "self_attn.rope_freq_idx"


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T, in x's dtype: weights stored narrower than the compute dtype (`Model.store_weights`)
    are widened for the product."""
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2] in float64, with LLaMA's scaling rules."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, length: int | None = None):
    """cos, sin: [max_positions, head_dim/2] float64 (angles computed in float64)."""
    length = length or config.max_position_embeddings
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_frequencies(config)[None, :]
    return angles.cos(), angles.sin()


def rms_norm(x, weight, eps):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def full_rope_index(config: ModelConfig) -> torch.Tensor:
    return torch.arange(config.head_dim // 2, dtype=torch.int32).repeat(config.num_key_value_heads, 1)


class Layer(nn.Module):
    """One decoder layer with fused projections at its own widths."""

    def __init__(self, config: ModelConfig, widths: LayerWidths, device=None, dtype=None):
        super().__init__()
        self.set_widths(config, widths)
        d = config.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.attn_norm = nn.Parameter(torch.ones(d, **kw), requires_grad=False)
        self.mlp_norm = nn.Parameter(torch.ones(d, **kw), requires_grad=False)
        self.wqkv = nn.Parameter(torch.zeros(self.qkv_sizes[-1], d, **kw), requires_grad=False)
        self.wo = nn.Parameter(torch.zeros(d, self.n_head * self.d_v, **kw), requires_grad=False)
        self.w_gate_up = nn.Parameter(torch.zeros(2 * self.k_mlp, d, **kw), requires_grad=False)
        self.w_down = nn.Parameter(torch.zeros(d, self.k_mlp, **kw), requires_grad=False)
        self.register_buffer("freq_idx", torch.zeros(self.n_kv, self.d_qk // 2, dtype=torch.int32, device=device))

    def set_widths(self, config: ModelConfig, widths: LayerWidths):
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.k_mlp, self.d_qk, self.d_v = widths.k_mlp, widths.d_qk, widths.d_v
        q, k = self.n_head * self.d_qk, self.n_kv * self.d_qk
        self.qkv_sizes = (q, q + k, q + k + self.n_kv * self.d_v)

    # ------------------------------------------------------------ weights i/o
    def split_weights(self) -> dict[str, torch.Tensor]:
        """HF-named weights of this layer (views into the fused tensors)."""
        q_end, k_end, _ = self.qkv_sizes
        return {
            "self_attn.q_proj": self.wqkv[:q_end],
            "self_attn.k_proj": self.wqkv[q_end:k_end],
            "self_attn.v_proj": self.wqkv[k_end:],
            "self_attn.o_proj": self.wo,
            "mlp.gate_proj": self.w_gate_up[: self.k_mlp],
            "mlp.up_proj": self.w_gate_up[self.k_mlp :],
            "mlp.down_proj": self.w_down,
            "input_layernorm": self.attn_norm,
            "post_attention_layernorm": self.mlp_norm,
        }

    @torch.no_grad()
    def load_weights(self, config: ModelConfig, widths: LayerWidths, w: dict[str, torch.Tensor], freq_idx):
        """Replace this layer's weights (possibly at new widths). `w` maps HF names to tensors."""
        self.set_widths(config, widths)
        dev, dt, dt_norm = self.wqkv.device, self.wqkv.dtype, self.attn_norm.dtype

        def param(t, dtype=dt):
            return nn.Parameter(t.to(device=dev, dtype=dtype).contiguous(), requires_grad=False)

        self.wqkv = param(torch.cat([w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]]))
        self.wo = param(w["self_attn.o_proj"])
        self.w_gate_up = param(torch.cat([w["mlp.gate_proj"], w["mlp.up_proj"]]))
        self.w_down = param(w["mlp.down_proj"])
        self.attn_norm = param(w["input_layernorm"], dt_norm)
        self.mlp_norm = param(w["post_attention_layernorm"], dt_norm)
        self.freq_idx = torch.as_tensor(freq_idx, dtype=torch.int32, device=dev).contiguous()

    @torch.no_grad()
    def pad_widths(self, config: ModelConfig, widths: LayerWidths):
        """Zero-pad this layer to wider `widths`; it computes the same function. Zero rotary pairs
        (appended to both halves of every query/key head, on frequencies the head does not use) add
        nothing to q·k; zero value dims meet zero columns of the output projection; zero MLP channels
        give silu(0)·0 = 0 into zero columns of the down projection."""
        d, H, H_kv = config.hidden_size, self.n_head, self.n_kv
        half, new_half = self.d_qk // 2, widths.d_qk // 2
        if new_half < half or widths.d_v < self.d_v or widths.k_mlp < self.k_mlp:
            raise ValueError(f"pad_widths only widens: {widths} from ({self.k_mlp}, {self.d_qk}, {self.d_v})")
        if new_half > config.head_dim // 2:
            raise ValueError(f"d_qk {widths.d_qk} exceeds head_dim {config.head_dim}")
        w = self.split_weights()

        def rows(t, heads, per, new_per):  # [heads·per, d] -> [heads·new_per, d], zero rows at each head's end
            return F.pad(t.reshape(heads, per, d), (0, 0, 0, new_per - per)).reshape(heads * new_per, d)

        def pairs(t, heads):  # [heads·d_qk, d] -> [heads·new d_qk, d]: both halves of every head widened
            return F.pad(t.reshape(heads, 2, half, d), (0, 0, 0, new_half - half)).reshape(heads * 2 * new_half, d)

        out = dict(w)
        out["self_attn.q_proj"] = pairs(w["self_attn.q_proj"], H)
        out["self_attn.k_proj"] = pairs(w["self_attn.k_proj"], H_kv)
        out["self_attn.v_proj"] = rows(w["self_attn.v_proj"], H_kv, self.d_v, widths.d_v)
        wo = F.pad(w["self_attn.o_proj"].reshape(d, H, self.d_v), (0, widths.d_v - self.d_v))
        out["self_attn.o_proj"] = wo.reshape(d, H * widths.d_v)
        out["mlp.gate_proj"] = F.pad(w["mlp.gate_proj"], (0, 0, 0, widths.k_mlp - self.k_mlp))
        out["mlp.up_proj"] = F.pad(w["mlp.up_proj"], (0, 0, 0, widths.k_mlp - self.k_mlp))
        out["mlp.down_proj"] = F.pad(w["mlp.down_proj"], (0, widths.k_mlp - self.k_mlp))
        freq_idx = []
        for kept in self.freq_idx.tolist():  # padded pairs take frequencies this KV group does not use
            unused = sorted(set(range(config.head_dim // 2)) - set(kept))
            freq_idx.append(kept + unused[: new_half - half])
        self.load_weights(config, widths, out, freq_idx)

    # ---------------------------------------------------------------- compute
    def qkv(self, x, linear=linear):
        """x: [B, T, d] normed -> q [B, T, H, d_qk], k [B, T, H_kv, d_qk], v [B, T, H_kv, d_v]."""
        B, T, _ = x.shape
        qkv = linear(x, self.wqkv)
        q_end, k_end, _ = self.qkv_sizes
        q = qkv[..., :q_end].view(B, T, self.n_head, self.d_qk)
        k = qkv[..., q_end:k_end].view(B, T, self.n_kv, self.d_qk)
        v = qkv[..., k_end:].view(B, T, self.n_kv, self.d_v)
        return q, k, v

    def mlp(self, x, linear=linear):
        gate_up = linear(x, self.w_gate_up)
        gate, up = gate_up[..., : self.k_mlp], gate_up[..., self.k_mlp :]
        return linear(F.silu(gate) * up, self.w_down)


@dataclass
class KVCache:
    """Per-layer caches at each layer's widths plus the per-sequence fill level."""

    k: list[torch.Tensor]  # [B, H_kv, S, d_qk] after RoPE
    v: list[torch.Tensor]  # [B, H_kv, S, d_v]
    lens: torch.Tensor  # [B] int32 tokens cached
    plan: object = None  # (tensors it points into, C++ DecodePlan, their pointers) of the fused CPU decode step
    layers: tuple = ()  # the model's config.layers this cache was checked against (`Model._check_cache`)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def copy_rows(self, other: KVCache, rows: int) -> KVCache:
        """Copy the first `rows` sequences (their cached positions and fill levels) into `other`, a cache of
        the same layers with room for them (a larger one, when a cache grows); returns `other`."""
        filled = int(self.lens[:rows].max()) if rows else 0
        for old, new in zip(self.k + self.v, other.k + other.v):
            new[:rows, :, :filled] = old[:rows, :, :filled]
        other.lens[:rows] = self.lens[:rows]
        return other


@dataclass
class Output:
    logits: torch.Tensor


class Model(nn.Module):
    def __init__(self, config: ModelConfig, device="cpu", dtype=torch.float32, backend="auto"):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size, **kw), requires_grad=False)
        self.layers = nn.ModuleList(Layer(config, w, **kw) for w in config.layers)
        self.norm = nn.Parameter(torch.ones(config.hidden_size, **kw), requires_grad=False)
        if config.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            self.lm_head = nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size, **kw), requires_grad=False)
        cos, sin = rope_tables(config)
        # Tables stay float32 at least: float16 angles would lose the high positions.
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("cos", cos.to(device=device, dtype=table_dtype), persistent=False)
        self.register_buffer("sin", sin.to(device=device, dtype=table_dtype), persistent=False)
        self.scale = 1.0 / math.sqrt(config.head_dim)  # the original scale: reduced q·k approximates the full one
        self.set_backend(backend)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, norms, KV cache)."""
        return self.norm.dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the matrices (projections, embedding, LM head) are stored in; see `store_weights`."""
        return self.embed.dtype

    @torch.no_grad()
    def store_weights(self, dtype: torch.dtype) -> Model:
        """Keep the matrices (every projection, the embedding and the LM head) in `dtype` while computing in
        the model's dtype: `store_weights(torch.bfloat16)` on a float32 CPU model halves the bytes a decode
        step reads (the C++ kernels widen each weight exactly as they stream it). The model then computes
        what the float32 model with bfloat16-rounded matrices computes. `dtype` equal to the model's dtype
        stores them at full width again; `.to()` and `.float()` set one dtype for everything."""
        if dtype not in (self.dtype, torch.bfloat16):
            raise ValueError(f"weights can be stored in {self.dtype} or bfloat16, not {dtype}")
        if dtype != self.dtype and (self.dtype != torch.float32 or self.device.type != "cpu"):
            raise ValueError(
                f"bfloat16 weights go with float32 compute on a CPU; this model computes in {self.dtype} on "
                f"{self.device} (on a GPU, load the model in bfloat16 instead)"
            )

        def narrow(p):
            return nn.Parameter(p.to(dtype).contiguous(), requires_grad=False)

        for layer in self.layers:
            for name in ("wqkv", "wo", "w_gate_up", "w_down"):
                setattr(layer, name, narrow(getattr(layer, name)))
        tied = self.lm_head is self.embed
        self.embed = narrow(self.embed)
        self.lm_head = self.embed if tied else narrow(self.lm_head)
        before, glue = self.backend, self.glue
        self.set_backend(self._backend_request)
        if self.backend == before:
            self.glue = glue  # a choice made by hand (benchmarks) survives, as in `_apply`
        return self

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `input_ids` in the compute dtype."""
        return F.embedding(input_ids, self.embed).to(self.dtype)

    @torch.no_grad()
    def use_huge_pages(self) -> int:
        """Move the weight matrices into CPU arenas on transparent huge pages (`modegpt_rt.hugepages`): one
        arena per layer for its four matrices, one for the embedding, one for an untied LM head. The same
        values, read faster by the decode step, which streams them all once per token. `load` does this on a
        CPU. An arena lives as long as any of its matrices, so a layer whose weights are all replaced (as the
        compressor does, layer by layer) frees its own. Returns the bytes placed, 0 where nothing was done
        (not a CPU model; the system grants no huge pages). `.to()` and `store_weights` allocate ordinary
        memory again."""
        if self.device.type != "cpu" or not hugepages.supported():
            return 0
        groups = [[(layer, n) for n in ("wqkv", "wo", "w_gate_up", "w_down")] for layer in self.layers]
        tied = self.lm_head is self.embed
        groups += [[(self, "embed")]] + ([] if tied else [[(self, "lm_head")]])
        placed = 0
        for owners in groups:
            tensors = [getattr(o, n).data.contiguous() for o, n in owners]

            def replace(i, view, owners=owners):
                owner, name = owners[i]
                setattr(owner, name, nn.Parameter(view, requires_grad=False))

            placed += hugepages.place(tensors, replace)
        if tied:
            self.lm_head = self.embed
        return placed

    def set_backend(self, backend: str) -> str:
        """Choose the attention implementation (auto | torch | cpu | triton); returns the one in use.

        With the C++ kernels the decode-time projections also use the C++ skinny product
        (weights streamed once per step for all batch rows); prefill-sized products stay with torch.
        """
        self.backend = kernels.resolve_backend(backend, self.device, self.dtype)
        self._backend_request = backend
        self._linear, self._fused = linear, False
        # glue ops (residual add + RMSNorm, SiLU·up) of the cached step: fused Triton kernels with the Triton
        # backend; set to "torch" to run them as plain torch ops (benchmarks compare the two)
        self.glue = "triton" if self.backend == "triton" else "torch"
        if (
            self.backend == "cpu"
            and self.dtype == torch.float32
            and self.weight_dtype in (torch.float32, torch.bfloat16)
        ):
            from modegpt_rt.kernels import cpu_linear

            if cpu_linear.available():
                self._linear, self._fused = cpu_linear.linear, True
        return self.backend

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.half()`, `.cuda()`...: keep the rope tables at float32 or more and choose the backend
        again for the new device and dtype (the C++ fast path reads float32 weights only; a backend asked for
        by name that no longer fits falls back to auto)."""
        super()._apply(fn, *args, **kwargs)
        table_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        if self.cos.dtype != table_dtype:
            cos, sin = rope_tables(self.config)
            self.cos, self.sin = cos.to(self.device, table_dtype), sin.to(self.device, table_dtype)
        before, glue = self.backend, self.glue
        try:
            self.set_backend(self._backend_request)
        except (ValueError, RuntimeError):
            self.set_backend("auto")
        if self.backend == before:
            self.glue = glue  # a choice made by hand (benchmarks) survives
        return self

    @torch.no_grad()
    def align_widths(self, mlp: int = 64, pairs: int = 8, v: int = 8) -> bool:
        """Zero-pad every layer to hardware-friendly widths (MLP channels to a multiple of `mlp`, rotary
        pairs per head to a multiple of `pairs`, value dims to a multiple of `v`; q/k/v never beyond
        head_dim). The model computes the same function. Done on load on a GPU (`load(align=...)`):
        compressed widths such as 10458 MLP channels or 121 value dims leave matrix rows and cache
        heads off 16-byte boundaries, which slowed every compressed model below dense there. Returns
        whether anything changed; `config.layers` then holds the padded widths."""
        cfg = self.config

        def up(x, m, cap):
            return max(x, min(-(-x // m) * m, cap))

        changed = False
        widths = []
        for layer in self.layers:
            new = LayerWidths(
                k_mlp=up(layer.k_mlp, mlp, cfg.intermediate_size),
                d_qk=2 * up(layer.d_qk // 2, pairs, cfg.head_dim // 2),
                d_v=up(layer.d_v, v, cfg.head_dim),
            )
            if new != LayerWidths(layer.k_mlp, layer.d_qk, layer.d_v):
                layer.pad_widths(cfg, new)
                changed = True
            widths.append(new)
        if changed:
            self.config = cfg.with_layers(widths, compression=cfg.compression)
        return changed

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        if capacity > self.config.max_position_embeddings:
            raise ValueError(
                f"cache capacity {capacity} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        kw = dict(device=self.device, dtype=self.dtype)
        ks = [torch.zeros(batch_size, layer.n_kv, capacity, layer.d_qk, **kw) for layer in self.layers]
        vs = [torch.zeros(batch_size, layer.n_kv, capacity, layer.d_v, **kw) for layer in self.layers]
        lens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        return KVCache(ks, vs, lens, layers=self.config.layers)

    # ------------------------------------------------------------ full forward
    def layer_forward(self, layer: Layer, h: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
        """One layer on full sequences, no cache (calibration, perplexity, scoring).

        Default: causal, every sequence from position 0. `positions` [B, T] and a boolean `mask`
        [B, 1, T, T] (True = attend) score packed sequences (several continuations of one context).
        """
        h = h + self.attention_block(layer, h, positions, mask)
        return h + layer.mlp(rms_norm(h, layer.mlp_norm, self.config.rms_norm_eps))

    def attention_block(self, layer: Layer, h: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
        """Attention sub-block output (before the residual add); see `layer_forward`."""
        return linear(self.attention_heads(layer, h, positions, mask), layer.wo)

    def attention_heads(self, layer: Layer, h: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
        """Concatenated attention head outputs [B, T, n_head·d_v], the input of the output projection."""
        from modegpt_rt.kernels.reference import apply_rope

        B, T, _ = h.shape
        q, k, v = layer.qkv(rms_norm(h, layer.attn_norm, self.config.rms_norm_eps))
        idx = layer.freq_idx.long()
        rows = slice(0, T) if positions is None else positions
        c = self.cos[rows][..., idx].to(h.dtype)  # [(B,) T, H_kv, d_qk/2]
        s = self.sin[rows][..., idx].to(h.dtype)
        G = layer.n_head // layer.n_kv
        q = apply_rope(q.view(B, T, layer.n_kv, G, layer.d_qk), c.unsqueeze(-2), s.unsqueeze(-2))
        q = q.view(B, T, layer.n_head, layer.d_qk)
        k = apply_rope(k, c, s)
        # torch's fused CPU/GPU attention needs equal q/k and v widths (else a ~5x slower path that
        # materializes T×T): zero-pad to the larger one. Zero q/k dims leave scores unchanged; zero
        # v dims give zero outputs, sliced off.
        width = max(layer.d_qk, layer.d_v)
        if layer.d_qk < width:
            q, k = F.pad(q, (0, width - layer.d_qk)), F.pad(k, (0, width - layer.d_qk))
        if layer.d_v < width:
            v = F.pad(v, (0, width - layer.d_v))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=G > 1,
        )[..., : layer.d_v]
        return out.transpose(1, 2).reshape(B, T, -1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> Output:
        """input_ids [B, T] (all sequences start at position 0) -> Output(logits [B, T, vocab])."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            what = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, tokens] tensor, got {what}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.config.vocab_size})")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed max_position_embeddings {self.config.max_position_embeddings}"
            )
        return Output(self.logits(self.hidden_states(input_ids)))

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
        """Last layer's output [B, T, d] before the final norm (`logits` applies it); args as `layer_forward`."""
        if positions is not None and int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} beyond max_position_embeddings")
        h = self.embed_tokens(input_ids.to(self.device))
        if positions is not None:
            positions = positions.to(self.device)
        if mask is not None:
            mask = mask.to(self.device)
        for layer in self.layers:
            h = self.layer_forward(layer, h, positions, mask)
        return h

    def generate(self, prompts, max_new_tokens: int = 64, **kwargs):
        """See `modegpt_rt.generate.generate`."""
        from modegpt_rt.generate import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def chat(self, conversations, max_new_tokens: int = 256, **kwargs):
        """Answer conversations (lists of `{"role", "content"}` messages; one, or a list of them) through the
        tokenizer's chat template: `generate` on `modegpt_rt.generate.chat_prompts`, same keywords, one
        `GenerationResult` per conversation. The model's end-of-sequence ids end the answer."""
        from modegpt_rt.generate import chat_prompts, generate

        tokenizer = kwargs.pop("tokenizer", None) or getattr(self, "tokenizer", None)
        ids = chat_prompts(conversations, tokenizer, getattr(self, "tokenizer_error", ""))
        return generate(self, ids, max_new_tokens, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------- cached inference
    @torch.no_grad()
    def step(
        self, input_ids: torch.Tensor, cache: KVCache, new_lens: torch.Tensor | None = None, last_only: bool = True
    ) -> torch.Tensor:
        """Append input_ids [B, T] (right-padded; new_lens [B] valid counts) to the cache.

        Returns logits [B, vocab] of each sequence's last valid new token (or [B, T, vocab]).
        """
        B, T = input_ids.shape
        if new_lens is None:
            new_lens = torch.full((B,), T, dtype=torch.int32, device=self.device)
        if int((cache.lens + new_lens).max()) > cache.capacity:
            raise ValueError(f"KV cache of {cache.capacity} positions cannot take {T} more tokens")
        if cache.layers is not self.config.layers:
            self._check_cache(cache)
        h = self._step_states(input_ids, cache, new_lens)
        cache.lens += new_lens
        if last_only:
            last = (new_lens.long() - 1).clamp(min=0)
            h = h[torch.arange(B, device=h.device), last]
        return self._linear(h, self.lm_head)

    def _check_cache(self, cache: KVCache):
        """A cache made before the layer widths changed (align_widths) would be written past its end."""
        B, S = cache.lens.shape[0], cache.capacity
        if len(cache.k) != len(self.layers) or len(cache.v) != len(self.layers):
            raise ValueError(f"the KV cache has {len(cache.k)} layers, the model {len(self.layers)}; make a new cache")
        for i, layer in enumerate(self.layers):
            k, v = tuple(cache.k[i].shape), tuple(cache.v[i].shape)
            if k != (B, layer.n_kv, S, layer.d_qk) or v != (B, layer.n_kv, S, layer.d_v):
                raise ValueError(
                    f"layer {i}: the KV cache holds {k} keys and {v} values, the layer has d_qk={layer.d_qk} and "
                    f"d_v={layer.d_v} (widths changed after new_cache?); make a new cache"
                )
        cache.layers = self.config.layers

    def _step_states(self, input_ids, cache, new_lens):
        """The step's final-normed hidden states [B, T, d] (cache.lens not yet advanced), by the fastest path
        for this backend: the C++ step (float32 CPU), fused Triton glue (`glue == "triton"`), or torch ops."""
        if self._fused:
            return self._step_fused(input_ids, cache, new_lens)
        if self.backend == "triton" and self.glue == "triton":
            from modegpt_rt.kernels import triton_attention, triton_fused

            h = self.embed_tokens(input_ids)
            ops = (triton_attention.attention, triton_fused.add_rms_norm, triton_fused.silu_mul)
            return self._step_glued(h, cache, new_lens, *ops)
        return self._step_modules(input_ids, cache, new_lens)

    def _step_modules(self, input_ids, cache, new_lens):
        """The step in plain torch ops; returns final-normed hidden states [B, T, d]."""
        B, T = input_ids.shape
        eps = self.config.rms_norm_eps
        lin = self._linear
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(rms_norm(h, layer.attn_norm, eps), lin)
            attn = kernels.attention(
                q,
                k,
                v,
                cache.k[i],
                cache.v[i],
                self.cos,
                self.sin,
                layer.freq_idx,
                cache.lens,
                new_lens,
                self.scale,
                backend=self.backend,
            )
            h = h + lin(attn.reshape(B, T, -1), layer.wo)
            h = h + layer.mlp(rms_norm(h, layer.mlp_norm, eps), lin)
        return rms_norm(h, self.norm, eps)

    def _step_fused(self, input_ids, cache, new_lens):
        """The same step with the C++ kernels (float32 CPU). Decode-sized steps (≤ DECODE_PLAN_MAX_ROWS new tokens
        in all) run every layer in one C++ call (`DecodePlan`); prefill-sized ones per op, with
        residual add + RMSNorm fused, SiLU·up fused, and MKL for the wide products."""
        from modegpt_rt.kernels import cpu, cpu_linear

        B, T = input_ids.shape
        h = self.embed_tokens(input_ids).contiguous()  # residual stream, updated in place
        if B * T <= DECODE_PLAN_MAX_ROWS:
            out = torch.empty_like(h)
            lens = new_lens.to(torch.int32).contiguous()
            self._decode_plan(cache).step(h.data_ptr(), out.data_ptr(), cache.lens.data_ptr(), lens.data_ptr(), T)
            return out
        return self._step_glued(h, cache, new_lens, cpu.attention, cpu_linear.add_rms_norm, cpu_linear.silu_mul)

    def _step_glued(self, h, cache, new_lens, attention, add_rms_norm, silu_mul):
        """A step over the embedded tokens `h` [B, T, d] (updated in place: the residual stream) with fused
        glue ops: `add_rms_norm(h, delta, w, eps)` (h += delta, returns the normed h), `silu_mul`; the C++
        ops on CPU, the Triton ones (`kernels/triton_fused.py`) on GPU. Returns final-normed states."""
        B, T, _ = h.shape
        eps = self.config.rms_norm_eps
        lin = self._linear
        norms = [layer.attn_norm for layer in self.layers] + [self.norm]
        x = add_rms_norm(h, None, norms[0], eps)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, lin)
            attn = attention(
                q, k, v, cache.k[i], cache.v[i], self.cos, self.sin, layer.freq_idx, cache.lens, new_lens, self.scale
            )
            x = add_rms_norm(h, lin(attn.reshape(B, T, -1), layer.wo), layer.mlp_norm, eps)
            down = lin(silu_mul(lin(x, layer.w_gate_up)), layer.w_down)
            x = add_rms_norm(h, down, norms[i + 1], eps)
        return x

    def _decode_plan(self, cache: KVCache):
        """The C++ plan of raw pointers into this model's weights and `cache`, built once per cache
        (rebuilt if a weight tensor was replaced since)."""
        from modegpt_rt.kernels import cpu_linear

        # dict lookups, not nn.Module attribute access: this runs every step
        tensors = [self._parameters["norm"]]
        for i, layer in enumerate(self.layers):
            p = layer._parameters
            tensors += [p["attn_norm"], p["wqkv"], p["wo"], p["mlp_norm"], p["w_gate_up"], p["w_down"]]
            tensors += [cache.k[i], cache.v[i], layer._buffers["freq_idx"]]
        # the plan holds raw pointers: it is valid while every tensor keeps its storage (a weight replaced, or
        # its .data swapped by .to()/.float(), changes the pointer) and the weights their dtype
        key = [t.data_ptr() for t in tensors] + [self.weight_dtype]
        if cache.plan is not None and cache.plan[2] == key:
            return cache.plan[1]
        cos = self.cos.to(torch.float32).contiguous()
        sin = self.sin.to(torch.float32).contiguous()
        if not all(t.is_contiguous() for t in tensors):
            raise RuntimeError("the fused decode step needs contiguous weights and caches")
        per = [tensors[1 + 9 * i : 10 + 9 * i] for i in range(len(self.layers))]
        matrices = [t for p in per for t in (p[1], p[2], p[4], p[5])]
        floats = [tensors[0]] + [t for p in per for t in (p[0], p[3], p[6], p[7])]
        if (
            any(t.dtype != self.weight_dtype for t in matrices)
            or any(t.dtype != torch.float32 for t in floats)
            or any(p[8].dtype != torch.int32 for p in per)
        ):
            raise RuntimeError("the fused decode step needs float32 norms and caches and one weight dtype")
        plan = cpu_linear.decode_plan(
            [[t.data_ptr() for t in p] for p in per],
            [[layer.d_qk, layer.d_v, layer.k_mlp] for layer in self.layers],
            final_norm=self.norm.data_ptr(),
            cos=cos.data_ptr(),
            sin=sin.data_ptr(),
            batch=cache.lens.shape[0],
            hidden=self.config.hidden_size,
            heads=self.config.num_attention_heads,
            kv_heads=self.config.num_key_value_heads,
            capacity=cache.capacity,
            positions=cos.shape[0],
            rot=cos.shape[1],
            eps=self.config.rms_norm_eps,
            scale=self.scale,
            weights_bf16=self.weight_dtype == torch.bfloat16,
        )
        cache.plan = (tensors + [cos, sin], plan, key)
        return plan
