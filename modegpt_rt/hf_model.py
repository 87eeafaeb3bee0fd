"""The transformers-facing model class (`AutoModelForCausalLM` resolves to it through
`modegpt_rt.hf`, which imports this module on first use).

transformers' own weight loader cannot map our per-layer widths onto its modules, so
`from_pretrained` goes through `modegpt_rt.load` and wraps the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from modegpt_rt.hf import ModegptConfig

CACHE_ROOM = 256  # positions after the prompt in the first cache `generate` gets (it doubles when full)


def _state_is_a_cache() -> bool:
    """Whether this transformers' `generate` carries a model output's `state` from step to step and hands it to
    `_reorder_cache` in beam search: transformers 5, whose `ALL_CACHE_NAMES` hold RWKV's `state`. (4.57 has the
    name too, but its beam search reorders only `past_key_values`: beams would read each other's rows.)"""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) >= 5 and "state" in ALL_CACHE_NAMES


@dataclass
class ModegptCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output (`logits`, `loss` with `labels`; no hidden states, attentions or
    transformers cache) plus, with `use_cache=True`, the runtime's KV cache (`state`)."""

    state: RuntimeState | None = None


class RuntimeState:
    """modegpt_rt's own KV cache carried through transformers' `generate` (its `state`, as RWKV's): `cache`
    holds every sequence's keys and values, `seen` how many of the ids `generate` holds went through it."""

    def __init__(self, cache, seen: int):
        self.cache, self.seen = cache, seen


def _packed_step(rt, ids: torch.Tensor, mask: torch.Tensor | None, cache, last: bool = False) -> torch.Tensor:
    """Append the tokens of `ids` [B, T] that `mask` marks valid (left or right padding; None: all) to each
    sequence in `cache`; logits [B, T, vocab] at the ids' own positions (zeros at the padded ones), or with
    `last` only those of position T-1 [B, 1, vocab]."""
    if mask is None or bool(mask.all()):
        logits = rt.step(ids, cache, None, last_only=last)
        return logits[:, None] if last else logits
    lens = mask.sum(1).to(torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid tokens first, in order
    packed = torch.gather(ids, 1, order) * torch.gather(mask, 1, order)
    if last and bool(mask[:, -1].all()):  # left padding: position T-1 is each row's last valid token
        return rt.step(packed, cache, lens, last_only=True)[:, None]
    packed_logits = rt.step(packed, cache, lens, last_only=False)
    logits = torch.zeros_like(packed_logits).scatter_(1, order[:, :, None].expand_as(packed_logits), packed_logits)
    return logits[:, -1:] if last else logits


def _grown(rt, cache, need: int):
    """`cache`, or a copy with room for `need` positions (capacity doubled at least, up to the context)."""
    if need <= cache.capacity:
        return cache
    ctx = rt.config.max_position_embeddings
    if need > ctx:
        raise ValueError(f"the sequences reach {need} tokens, beyond the model's context of {ctx}")
    rows = cache.lens.shape[0]
    return cache.copy_rows(rt.new_cache(rows, min(ctx, max(need, 2 * cache.capacity))), rows)


class ModegptForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers-facing wrapper of `modegpt_rt.model.Model`.

    A forward runs the (left- or right-padded) sequences through the runtime's step with per-sequence
    lengths. With `use_cache=True`, which `generate` passes, it also returns the runtime's KV cache as
    `state`; a forward given that `state` appends its ids to it, and `generate`'s
    `prepare_inputs_for_generation` passes only the ids the cache has not seen, so `generate` (greedy,
    sampling, beam search) decodes one token per step instead of recomputing the sequence. Turn it off with
    `generate(..., use_cache=False)` or `model.config.use_cache = False`. transformers before 5 keeps
    recomputing (its beam search would not reorder the cache). `modegpt_rt`'s own
    `model.generate` (stop strings, streaming, rows that end leave the batch) remains the faster path.
    """

    config_class = ModegptConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False
    _is_stateful = True  # the cache cannot be rolled back (assisted generation needs that)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the runtime keeps its own cache (`state`), at each layer's widths

    def __init__(self, config: ModegptConfig, runtime_model=None):
        super().__init__(config)
        self.runtime = runtime_model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        import modegpt_rt

        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        device = kwargs.pop("device", None) or kwargs.pop("device_map", None) or "cpu"
        if isinstance(device, dict):
            device = next(iter(device.values()))
        if device == "auto":  # one device holds the whole model: the GPU when there is one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        runtime = modegpt_rt.load(pretrained_model_name_or_path, device=device, dtype=dtype, tokenizer=False)
        config = kwargs.pop("config", None)
        if not isinstance(config, ModegptConfig):
            config = ModegptConfig.from_pretrained(pretrained_model_name_or_path)
        model = cls(config, runtime)
        model.eval()
        return model

    def get_input_embeddings(self):
        return None

    @property
    def device(self):
        return self.runtime.device

    @property
    def dtype(self):
        return self.runtime.dtype

    @torch.no_grad()
    def forward(
        self, input_ids=None, attention_mask=None, labels=None, state=None, use_cache=None, logits_to_keep=0, **kwargs
    ):
        """Logits [B, T, vocab] (`logits_to_keep=k` > 0: those of the last k positions; `generate` asks for 1,
        so a prompt's other positions skip the LM head)."""
        rt = self.runtime
        input_ids = input_ids.to(rt.device)
        B, T = input_ids.shape
        mask = None if attention_mask is None else attention_mask[:, -T:].to(rt.device).bool()
        last = isinstance(logits_to_keep, int) and logits_to_keep == 1 and labels is None
        use_cache = use_cache and getattr(self.config, "use_cache", True) is not False
        if state is not None or (use_cache and _state_is_a_cache()):
            if state is None:  # prefill: a cache with room for CACHE_ROOM new tokens; it grows when they are not enough
                state = RuntimeState(rt.new_cache(B, min(rt.config.max_position_embeddings, T + CACHE_ROOM)), 0)
            cache = _grown(rt, state.cache, int(state.cache.lens.max()) + T)
            logits = _packed_step(rt, input_ids, mask, cache, last)
            state = RuntimeState(cache, state.seen + T)
        elif not last and (mask is None or bool(mask.all())):
            logits = rt(input_ids).logits
        else:
            logits = _packed_step(rt, input_ids, mask, rt.new_cache(B, T), last)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers allows
            logits = logits[:, logits_to_keep.to(logits.device)]
        elif logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        return ModegptCausalLMOutput(loss=loss, logits=logits, state=state)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write the runtime model as a modegpt checkpoint (transformers' writer would name the wrapped
        tensors `runtime.*`, which no loader reads). As with transformers, the folder may exist: config.json
        and the weights are replaced (each file atomically), stale weight shards removed, and the folder's
        other files (a tokenizer saved beside the model, anything else) kept."""
        from modegpt_rt.checkpoint import save_checkpoint

        save_checkpoint(self.runtime, save_directory, tokenizer=kwargs.get("tokenizer"), update=True)

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, state=None, use_cache=None, logits_to_keep=0, **kwargs
    ):
        if state is not None:
            input_ids = input_ids[:, state.seen :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "state": state,
            "use_cache": use_cache,
            "logits_to_keep": logits_to_keep,
        }

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        if outputs.get("state") is not None:
            model_kwargs["state"] = outputs["state"]
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def _reorder_cache(self, state: RuntimeState, beam_idx: torch.Tensor) -> RuntimeState:
        """Beam search: row i of the cache becomes row beam_idx[i]."""
        c, idx = state.cache, beam_idx.to(state.cache.lens.device)
        c.k, c.v = [k[idx] for k in c.k], [v[idx] for v in c.v]
        c.lens, c.plan = c.lens[idx], None
        return state
