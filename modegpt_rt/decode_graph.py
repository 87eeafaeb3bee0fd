"""The decode step (one new token per sequence) captured once in a CUDA graph and replayed.

A decode step of a small model, or of any model at small batch, is a few hundred short kernel
launches (30 layers × norms, projections, RoPE + cache append, split attention, reduce, MLP);
on a GPU their launch overhead, not the work, sets the pace. Replaying one captured graph
launches them all at once. Everything the step reads lives at fixed addresses: the input
tokens (`ids`, copied in before each replay), the KV cache, and the fill levels `cache.lens`,
which the graph itself advances. The Triton kernels take the fill levels as a device tensor
and their launch grids depend on the cache capacity only, so one capture serves every step.

Without `capture` (CPU, or to check the static path) the same step runs eagerly.
"""

from __future__ import annotations

import contextlib

import torch

from modegpt_rt.model import KVCache, Model


def graph_capturable(model: Model) -> bool:
    """Whether `model`'s decode step can be recorded in a CUDA graph: on a CUDA device with the Triton backend
    (the torch reference's cache update reads sizes on the host; the fused C++ step is CPU-only)."""
    return model.device.type == "cuda" and model.backend == "triton" and not model._fused


class DecodeGraph:
    def __init__(self, model: Model, cache: KVCache, capture: bool | None = None, warmup: int = 2):
        if model._fused:
            raise ValueError("the fused C++ decode step is one call already; a decode graph is for GPU backends")
        if capture is None:
            capture = graph_capturable(model)
        if capture and not graph_capturable(model):
            raise ValueError(
                "CUDA graph capture needs a model on a CUDA device with the triton backend (the torch reference "
                "reads sizes on the host, which a graph cannot record)"
            )
        self.model, self.cache = model, cache
        B = cache.lens.shape[0]
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.ones = torch.ones(B, dtype=torch.int32, device=model.device)
        # one host read here; afterwards the host counts the steps (a replay cannot check)
        self.room = cache.capacity - int(cache.lens.max()) if B else 0
        self.graph = None
        self.logits = None
        if warmup:
            # compile/autotune the kernels (and let the caching allocator settle) before a capture;
            # the warm-up steps write K/V beyond the fill level and advance it, so the level is restored
            if self.room < 1:
                raise ValueError("the KV cache is full; no room for a decode step")
            lens = cache.lens.clone()
            stream = torch.cuda.Stream() if capture else None
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for _ in range(warmup):
                    self._step()
                    cache.lens.copy_(lens)
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        m = self.model
        h = m._step_states(self.ids, self.cache, self.ones)  # [B, 1, d], final-normed
        self.cache.lens += self.ones
        return m._linear(h[:, 0], m.lm_head)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (tokens [B] or [B, 1]); returns logits [B, vocab].

        With a graph the logits live in a buffer that the next call overwrites."""
        if self.room < 1:
            raise ValueError(f"KV cache of {self.cache.capacity} positions is full")
        self.room -= 1
        self.ids.copy_(tokens.reshape(self.ids.shape))
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
