"""The Qwen2 LLM's forward over new positions, written as a plain loop over its layers (gpt-fast style).

It calls the model's own submodules (norms, projections, MLP, rotary embedding) and makes the attention call
exactly as transformers' sdpa integration makes it (the same GQA packing, the same ``is_causal`` rule), so
the hidden states equal those of ``Qwen2Model.forward`` bit for bit. What it leaves out is what costs host
time per token: the cache classes, mask construction for every call, output dataclasses, hooks and kwargs
plumbing.

Two ways to run a decode step:
- :func:`forward` (eager): attends over the filled part of the :class:`StaticKV` (a view; no mask unless the
  batch is padded), identical arithmetic to transformers' dynamic cache path;
- :func:`static_step` (captured): fixed shapes over the whole bucket with a boolean mask, no Python state
  read from tensors, written for ``torch.compile(fullgraph=True)`` (CUDA graphs with ``reduce-overhead``).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from minicpmo_cli.generation.static_cache import StaticKV

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def cache_keyword(decoder_class: type) -> str:
    """transformers 5.x renames the decoder's ``past_key_values`` argument to ``cache`` (the old name still
    works with a deprecation warning); use whichever this version declares."""
    import inspect

    params = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def attend(attn, query, key, value, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers ``sdpa_attention_forward`` for Qwen2 (no dropout, no sliding window); ``[B, q, H*D]``."""
    groups = attn.num_key_value_groups
    q_len = query.shape[2]
    extra = {}
    if groups > 1:
        if mask is None and key.shape[-1] <= 256:
            extra["enable_gqa"] = True
        elif q_len == 1:
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[3])
        else:
            key = _repeat_kv(key, groups)
            value = _repeat_kv(value, groups)
    is_causal = q_len > 1 and mask is None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling,
                                         is_causal=is_causal, **extra)
    out = out.reshape(out.shape[0], -1, q_len, value.shape[-1]).transpose(1, 2).contiguous()
    return out.reshape(out.shape[0], q_len, -1).contiguous()


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, dim = states.shape
    states = states[:, :, None].expand(batch, heads, groups, length, dim)
    return states.reshape(batch, heads * groups, length, dim)


def _project(attn, x: torch.Tensor, cos, sin):
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def forward(llm, embeds: torch.Tensor, positions: torch.Tensor, cache: StaticKV,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Final-norm hidden states ``[B, n, D]`` of ``n`` new positions appended to ``cache`` (eager).

    ``mask``: None (no padding; causal when ``n > 1`` and the cache was empty) or bool ``[B, 1, n, past + n]``.
    """
    decoder = llm.model
    cos, sin = decoder.rotary_emb(embeds, positions)
    slots = torch.arange(cache.length, cache.length + embeds.shape[1], device=embeds.device)
    hidden = embeds
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        residual = hidden
        q, k, v = _project(attn, layer.input_layernorm(hidden), cos, sin)
        keys, values = cache.write(index, k, v, slots)
        hidden = residual + attn.o_proj(attend(attn, q, keys, values, mask))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    cache.advance(embeds.shape[1])
    return decoder.norm(hidden)


def static_step(llm, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """One decode step over the whole bucket: ``tokens`` ``[B]`` at ``positions`` ``[B, 1]``, written at cache
    slot ``index`` (``[1]``), attending where ``mask`` ``[B, 1, 1, S]`` is True. Returns float32 logits
    ``[B, V]``. Every shape is fixed by (B, S), so one capture serves a whole bucket."""
    decoder = llm.model
    embeds = decoder.embed_tokens(tokens[:, None])
    cos, sin = decoder.rotary_emb(embeds, positions)
    hidden = embeds
    for number, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        residual = hidden
        q, k, v = _project(attn, layer.input_layernorm(hidden), cos, sin)
        keys[number].index_copy_(2, index, k)
        values[number].index_copy_(2, index, v)
        hidden = residual + attn.o_proj(attend(attn, q, keys[number], values[number], mask))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = decoder.norm(hidden)
    return llm.lm_head(hidden[:, -1]).float()


_COMPILED: dict[str, object] = {}
_WARM: set[tuple] = set()


def compiled_step(device: torch.device):
    """``static_step`` under torch.compile: CUDA graphs (``reduce-overhead``) on CUDA, Inductor on the CPU."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind == "cuda" else None
        _COMPILED[kind] = torch.compile(static_step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[kind]


def run_compiled(llm, tokens, positions, index, mask, cache: StaticKV) -> torch.Tensor:
    """The captured step; the first call of each (batch, bucket) shape is timed and logged (warm-up)."""
    step = compiled_step(tokens.device)
    shape = (tokens.device.type, id(llm), tokens.shape[0], cache.capacity)
    if shape in _WARM:
        # clone: a CUDA-graph replay overwrites its outputs in place at the next step
        return step(llm, tokens, positions, index, mask, cache.keys, cache.values).clone()
    started = time.perf_counter()
    logits = step(llm, tokens, positions, index, mask, cache.keys, cache.values)
    logits = logits.clone()
    _WARM.add(shape)
    logger.info("compiled the decode step for batch %d, cache %d in %.1f s", shape[2], shape[3],
                time.perf_counter() - started)
    return logits
