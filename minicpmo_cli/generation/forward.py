"""The Qwen2 LLM's forward over new positions, written as a plain loop over its layers (gpt-fast style).

It runs the model's own weights through the same kernels that transformers' Qwen2 code calls, and makes the
attention call exactly as transformers' sdpa integration makes it (the same GQA packing, the same
``is_causal`` rule), so the hidden states equal those of ``Qwen2Model.forward`` bit for bit. What it leaves
out is what costs host time per token: the cache classes, mask construction for every call, output
dataclasses, ``nn.Module.__call__`` and its hooks, kwargs plumbing.

Three entry points:
- :func:`forward` (eager, any number of new positions; the streaming session's prefill): attends over the
  filled part of the :class:`StaticKV` (a view; no mask unless the batch is padded);
- :func:`decode_step` (eager, one new token per row; the token loop): the same arithmetic with fewer ops per
  layer (hidden states 2-D, the rotary sign folded once per step, no-op dtype casts skipped);
- :func:`slot_step` (the engine's KV slots, generation/kv_pool.py): one new token per slot, each at its own
  position; eager over the filled span, or over the whole capacity with a mask (the form a step runner
  captures: CUDA graph or torch.compile, generation/step_runner.py);
- :func:`static_step` (captured): one caller's :class:`StaticKV` over the whole bucket with a boolean mask,
  no Python state read from tensors (a streaming session's step under a graph/compile runner).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

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
    q = _linear(attn.q_proj, x).view(shape).transpose(1, 2)
    k = _linear(attn.k_proj, x).view(shape).transpose(1, 2)
    v = _linear(attn.v_proj, x).view(shape).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate_half_form(q, cos, sin), _rotate_half_form(k, cos, sin), v


def _rotate_half_form(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one tensor, op for op (``x * cos + rotate_half(x) * sin``),
    called directly: transformers routes its own through a kernel-hub module wrapper on every call."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def forward(llm, embeds: torch.Tensor, positions: torch.Tensor, cache: StaticKV,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Final-norm hidden states ``[B, n, D]`` of ``n`` new positions appended to ``cache`` (eager). The
    submodules run through :func:`_linear` / :func:`_rms_norm` / :func:`_mlp` (their own arithmetic without
    ``nn.Module.__call__``): a prompt pass costs host time per op, not per position.

    ``mask``: None (no padding; causal when ``n > 1`` and the cache was empty) or bool ``[B, 1, n, past + n]``.
    """
    decoder = llm.model
    cos, sin = decoder.rotary_emb(embeds, positions)
    slots = torch.arange(cache.length, cache.length + embeds.shape[1], device=embeds.device)
    hidden = embeds
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        residual = hidden
        q, k, v = _project(attn, _rms_norm(layer.input_layernorm, hidden), cos, sin)
        keys, values = cache.write(index, k, v, slots)
        hidden = residual + _linear(attn.o_proj, attend(attn, q, keys, values, mask))
        hidden = hidden + _mlp(layer, hidden)
    cache.advance(embeds.shape[1])
    return _rms_norm(decoder.norm, hidden)


def _hooked(module) -> bool:
    """Whether ``module`` has its own forward hooks (e.g. a server counting ``lm_head`` passes): then it is
    called through ``nn.Module.__call__`` so that they run; otherwise that machinery is skipped."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def any_hooked(modules) -> bool:
    """Whether any of ``modules`` has forward hooks now (someone watching the passes, e.g. a test): a traced or
    scripted call would not run them, so the eager pass runs instead."""
    return any(_hooked(module) for module in modules)


def _call(module, *args):
    return module(*args) if _hooked(module) else module.forward(*args)


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without ``nn.Module.__call__``: a plain ``nn.Linear`` is ``F.linear`` on its own tensors
    (on a 2-D input that is the same ``addmm`` / ``mm`` that ``[B, 1, D]`` folds to); other kinds (int8/int4
    layers) run their own ``forward``."""
    if type(module) is nn.Linear and not _hooked(module):
        return F.linear(x, module.weight, module.bias)
    return _call(module, x)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``Qwen2RMSNorm.forward`` op for op, minus its dtype casts when they are no-ops (float32 models), which
    still cost a dispatch each; other norm kinds run their own ``forward``."""
    if type(norm) is not Qwen2RMSNorm or _hooked(norm):
        return _call(norm, x)
    h = x if x.dtype == torch.float32 else x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


def step_rotary(decoder, like: torch.Tensor, positions: torch.Tensor):
    """cos and a signed sin ``[B, 1, 1, head_dim]`` for one new position per row (``positions`` ``[B, 1]``).

    transformers rotates with ``q * cos + rotate_half(q) * sin``, ``rotate_half(q) = cat(-q2, q1)``. With the
    sign moved into sin, ``roll(q) * cat(-sin1, sin2)`` makes the same products (an IEEE negation is exact and
    commutes with the product), so every layer saves the slicing and the negation of ``rotate_half``."""
    cos, sin = _call(decoder.rotary_emb, like, positions)
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], signed[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _qkv(layer, hidden, cos, sin):
    """Input norm, q/k/v projections and rotary of one layer for one new position per row (``[B, D]``)."""
    attn = layer.self_attn
    x = _rms_norm(layer.input_layernorm, hidden)
    shape = (hidden.shape[0], -1, 1, attn.head_dim)
    q = _linear(attn.q_proj, x).view(shape)
    k = _linear(attn.k_proj, x).view(shape)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), _linear(attn.v_proj, x).view(shape)


def _mlp(layer, hidden):
    mlp = layer.mlp
    x = _rms_norm(layer.post_attention_layernorm, hidden)
    gate = _call(mlp.act_fn, _linear(mlp.gate_proj, x))
    return _linear(mlp.down_proj, gate * _linear(mlp.up_proj, x))


def attend_one(attn, query, key, value, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`attend` for a single query position, ``[B, H*D]`` (the same sdpa call; for one position the
    head-major output already is transformers' ``transpose(1, 2).reshape`` layout)."""
    groups = attn.num_key_value_groups
    extra = {}
    if groups > 1:
        if mask is None and key.shape[-1] <= 256:
            extra["enable_gqa"] = True
        else:
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[3])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling, **extra)
    return out.reshape(out.shape[0], -1)


def decode_step(llm, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKV,
                mask: torch.Tensor | None) -> torch.Tensor:
    """One new token per row (eager, for the token loop): ``tokens`` ``[B]`` at ``positions`` ``[B, 1]``;
    float32 logits ``[B, V]``. Bit-identical to :func:`forward` + ``lm_head`` (and so to ``Qwen2Model``):
    the same kernels on the same values, with hidden states kept 2-D ``[B, D]`` (the shape transformers'
    linears fold ``[B, 1, D]`` to), the submodules' own ``forward`` called without ``__call__`` (unless they
    have forward hooks: :func:`_hooked`), the rotary
    sign folded once per step (:func:`step_rotary`) and the mask left out when the batch is unpadded."""
    decoder = llm.model
    hidden = _call(decoder.embed_tokens, tokens)
    cos, sin = step_rotary(decoder, hidden, positions)
    slot = torch.full((1,), cache.length, dtype=torch.long, device=tokens.device)
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = _qkv(layer, hidden, cos, sin)
        keys, values = cache.write(index, k, v, slot)
        hidden = hidden + _linear(attn.o_proj, attend_one(attn, q, keys, values, mask))
        hidden = hidden + _mlp(layer, hidden)
    cache.advance(1)
    return _linear(llm.lm_head, _rms_norm(decoder.norm, hidden)).float()


def slot_step(llm, tokens: torch.Tensor, positions: torch.Tensor, pool, mask: torch.Tensor | None,
              span: int) -> torch.Tensor:
    """One new token for each of the pool's slots ``[0, B)`` (generation/kv_pool.py): ``tokens`` ``[B]`` at
    ``positions`` ``[B]`` (each row its own), each written at its own position of its slot; attention over the
    first ``span`` positions of every slot where ``mask`` ``[B, 1, 1, span]`` is True (None: every row sits at
    position ``span - 1``, no padding). Float32 logits ``[B, V]``.

    With ``span`` = the filled length + 1 and no mask this is :func:`decode_step`'s arithmetic exactly (the same
    kernels on the same values); with ``span`` = the capacity and a mask every shape is fixed by (B, capacity):
    the form a CUDA graph captures (generation/step_runner.py)."""
    decoder = llm.model
    batch = tokens.shape[0]
    hidden = _call(decoder.embed_tokens, tokens)
    cos, sin = step_rotary(decoder, hidden, positions[:, None])
    mask = additive_mask(mask, hidden.dtype)
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = _qkv(layer, hidden, cos, sin)
        pool.write_rows(index, k, v, positions)
        keys = pool.keys[index][:batch, :, :span]
        values = pool.values[index][:batch, :, :span]
        hidden = hidden + _linear(attn.o_proj, attend_one(attn, q, keys, values, mask))
        hidden = hidden + _mlp(layer, hidden)
    return _linear(llm.lm_head, _rms_norm(decoder.norm, hidden)).float()


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask as the additive one sdpa makes of it (0 where True, -inf where False), made
    once per step instead of once per layer: the same values reach the kernel."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))


def static_step(llm, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """One decode step over the whole bucket: ``tokens`` ``[B]`` at ``positions`` ``[B, 1]``, written at cache
    slot ``index`` (``[1]``), attending where ``mask`` ``[B, 1, 1, S]`` is True. Returns float32 logits
    ``[B, V]``. Every shape is fixed by (B, S), so one capture serves a whole bucket. Traced module by module:
    the captured path for layer kinds :func:`stock_step` does not take (int8/int4 linears)."""
    decoder = llm.model
    hidden = decoder.embed_tokens(tokens)
    cos, sin = step_rotary(decoder, hidden, positions)
    for number, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = _qkv(layer, hidden, cos, sin)
        keys[number].index_copy_(2, index, k)
        values[number].index_copy_(2, index, v)
        hidden = hidden + _linear(attn.o_proj, attend_one(attn, q, keys[number], values[number], mask))
        hidden = hidden + _mlp(layer, hidden)
    return _linear(llm.lm_head, _rms_norm(decoder.norm, hidden)).float()
