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
- :func:`stock_step` / :func:`static_step` (captured): fixed shapes over the whole bucket with a boolean
  mask, no Python state read from tensors, written for ``torch.compile(fullgraph=True)`` (CUDA graphs with
  ``reduce-overhead``); :func:`run_compiled` picks one and logs the warm-up.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

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


def _hooked(module) -> bool:
    """Whether ``module`` has its own forward hooks (e.g. a server counting ``lm_head`` passes): then it is
    called through ``nn.Module.__call__`` so that they run; otherwise that machinery is skipped."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


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


def stock_step(tokens, cos, sin, index, mask, keys: list, values: list, weights: tuple, sizes: tuple):
    """:func:`static_step` over plain tensors, for a model whose layers are all the stock kind.

    ``weights``: ``(embedding, final norm, lm_head, per-layer tuples of :func:`_stock_tensors`)``; ``sizes``:
    ``(eps, head_dim, scaling, groups)``; ``cos`` / ``sin``: :func:`step_rotary`'s. Nothing here is a module,
    so the compiled function's guards are tensor checks only (guards on a whole model's modules cost more
    than the step itself on a CPU), and the layers go through two nested compile regions
    (:func:`_region_qkv`, :func:`_region_rest`) that Dynamo and Inductor compile once and reuse for every
    layer instead of unrolling the loop (28 layers compile in about the time of a few)."""
    embedding, final_norm, head, layers = weights
    eps, head_dim, scaling, groups = sizes
    hidden = F.embedding(tokens, embedding)
    for number, tensors in enumerate(layers):
        q, k, v = _region_qkv(hidden, cos, sin, *tensors[:7], eps, head_dim)
        keys[number].index_copy_(2, index, k)
        values[number].index_copy_(2, index, v)
        hidden = _region_rest(hidden, q, keys[number], values[number], mask, *tensors[7:], eps, scaling, groups)
    return F.linear(_norm(hidden, final_norm, eps), head).float()


_STOCK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stock_weights(llm) -> tuple | None:
    """``(weights, sizes)`` for :func:`stock_step`, or None when a part of the model is not the stock kind.
    Found once per model (swap modules, e.g. quantize, before its first decode); the parameter objects stay
    the same when a model moves (``.to`` swaps their data)."""
    if llm not in _STOCK:
        decoder, head = llm.model, llm.lm_head
        layers = tuple(_stock_tensors(layer) for layer in decoder.layers)
        norms = [decoder.norm, *(n for layer in decoder.layers
                                 for n in (layer.input_layernorm, layer.post_attention_layernorm))]
        plain = (all(t is not None for t in layers) and type(decoder.norm) is Qwen2RMSNorm
                 and type(head) is nn.Linear and head.bias is None and type(decoder.embed_tokens) is nn.Embedding
                 and len({n.variance_epsilon for n in norms}) == 1)
        attn = decoder.layers[0].self_attn
        sizes = (float(decoder.norm.variance_epsilon), int(attn.head_dim), float(attn.scaling),
                 int(attn.num_key_value_groups))
        weights = (decoder.embed_tokens.weight, decoder.norm.weight, head.weight, layers)
        _STOCK[llm] = (weights, sizes) if plain else None
    return _STOCK[llm]


def _stock_tensors(layer) -> tuple | None:
    """A layer's tensors in :func:`_region_qkv` / :func:`_region_rest` order when every part of it is the stock
    kind (``nn.Linear``, ``Qwen2RMSNorm``, SiLU), else None."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if (any(type(m) is not nn.Linear for m in linears) or any(type(n) is not Qwen2RMSNorm for n in norms)
            or type(mlp.act_fn) is not SiLUActivation or attn.o_proj.bias is not None):
        return None
    return (layer.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
            attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight,
            layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@torch.compiler.nested_compile_region
def _region_qkv(hidden, cos, sin, norm_w, wq, bq, wk, bk, wv, bv, eps: float, head_dim: int):
    """Norm, q/k/v projections and rotary of one stock layer (compiled once, reused by every layer)."""
    x = _norm(hidden, norm_w, eps)
    shape = (hidden.shape[0], -1, 1, head_dim)
    q = F.linear(x, wq, bq).view(shape)
    k = F.linear(x, wk, bk).view(shape)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), F.linear(x, wv, bv).view(shape)


@torch.compiler.nested_compile_region
def _region_rest(hidden, q, keys, values, mask, wo, norm_w, w_gate, w_up, w_down, eps: float, scaling: float,
                 groups: int):
    """Attention over the bucket, output projection, MLP and both residuals of one stock layer."""
    batch, heads, _, dim = q.shape
    if groups > 1:
        q = q.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling).reshape(batch, -1)
    hidden = hidden + F.linear(out, wo)
    x = _norm(hidden, norm_w, eps)
    return hidden + F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


_COMPILED: dict[tuple, object] = {}
_WARM: set[tuple] = set()


def compiled_step(device: torch.device, stock: bool):
    """:func:`stock_step` (or :func:`static_step`) under torch.compile: CUDA graphs (``reduce-overhead``) on
    CUDA, Inductor on the CPU."""
    kind = ("cuda" if device.type == "cuda" else "cpu", stock)
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind[0] == "cuda" else None
        _COMPILED[kind] = torch.compile(stock_step if stock else static_step, mode=mode, fullgraph=True,
                                        dynamic=False)
    return _COMPILED[kind]


def run_compiled(llm, tokens, positions, index, mask, cache: StaticKV) -> torch.Tensor:
    """The captured step; the first call of each (batch, bucket) shape is timed and logged (warm-up).

    On the CPU stock models take :func:`stock_step`. On CUDA the module-based :func:`static_step` stays: CUDA
    graphs treat module parameters as static inputs, weights passed as plain arguments might be copied in."""
    stock = stock_weights(llm) if tokens.device.type == "cpu" else None
    step = compiled_step(tokens.device, stock is not None)
    if tokens.device.type == "cuda":
        cache.mark_static()
    if stock is None:
        args = (llm, tokens, positions, index, mask, cache.keys, cache.values)
    else:
        cos, sin = step_rotary(llm.model, stock[0][0], positions)
        args = (tokens, cos, sin, index, mask, cache.keys, cache.values, *stock)
    shape = (tokens.device.type, id(llm), tokens.shape[0], cache.capacity)
    if shape in _WARM:
        # clone: a CUDA-graph replay overwrites its outputs in place at the next step
        return step(*args).clone()
    started = time.perf_counter()
    logits = step(*args).clone()
    _WARM.add(shape)
    logger.info("compiled the decode step for batch %d, cache %d in %.1f s", shape[2], shape[3],
                time.perf_counter() - started)
    return logits
