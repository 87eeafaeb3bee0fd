"""The transformers-facing model class (`AutoModelForCausalLM` resolves to it through
`modegpt_rt.hf`, which imports this module on first use).

transformers' own weight loader cannot map our per-layer widths onto its modules, so
`from_pretrained` goes through `modegpt_rt.load` and wraps the result.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from modegpt_rt.hf import ModegptConfig


class ModegptForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers-facing wrapper of `modegpt_rt.model.Model`.

    Each forward recomputes the whole (left-padded) sequence through the runtime's
    cached step with per-sequence lengths; for fast generation use `modegpt_rt`'s own
    `model.generate`, which keeps a KV cache.
    """

    config_class = ModegptConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

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
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        rt = self.runtime
        input_ids = input_ids.to(rt.device)
        B, T = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):
            logits = rt(input_ids).logits
        else:
            # left or right padding -> each sequence's tokens packed at positions 0..n-1
            mask = attention_mask.to(rt.device).bool()
            lens = mask.sum(1).to(torch.int32)
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid tokens first
            packed = torch.gather(input_ids, 1, order) * torch.gather(mask, 1, order)
            cache = rt.new_cache(B, T)
            packed_logits = rt.step(packed, cache, lens, last_only=False)
            logits = torch.zeros_like(packed_logits).scatter_(
                1, order[:, :, None].expand_as(packed_logits), packed_logits
            )
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write the runtime model as a modegpt checkpoint (transformers' writer would name the wrapped
        tensors `runtime.*`, which no loader reads). As with transformers, the folder may exist: config.json
        and the weights are replaced (each file atomically), stale weight shards removed, and the folder's
        other files (a tokenizer saved beside the model, anything else) kept."""
        from modegpt_rt.checkpoint import save_checkpoint

        save_checkpoint(self.runtime, save_directory, tokenizer=kwargs.get("tokenizer"), update=True)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
