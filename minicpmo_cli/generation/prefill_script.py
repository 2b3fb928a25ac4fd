"""A prompt chunk's pass through the LLM's layers as one TorchScript call (the engine's CPU prefill).

Why: an eager prefill is a few hundred torch calls, and each one lets go of the GIL and must take it back. In a
server the event loop runs Python beside the engine, so each of those hand-backs can wait for the event loop's
switch interval: a 1-token request in the tiny checkpoint's engine took 1.5 ms alone and ~950 ms beside a busy
Python thread (5 ms switch interval). A scripted function runs its ops in C++ with the GIL let go once.

Unlike a traced step (generation/step_trace.py) a scripted function keeps its shapes symbolic: one compile
serves every prompt length, so a new length costs nothing. It makes the same aten calls as
``forward.forward`` for Qwen2 layers made of plain ``nn.Linear``, ``Qwen2RMSNorm`` and SiLU (the attention
call with the same GQA packing and ``is_causal`` rule, the rotary's ``rotate_half`` form, the KV written with
``index_copy_``), so its hidden states are bit-identical to it; the rotary cos/sin come from the model's own
rotary module. Any other kind of layer, or a module with forward hooks, keeps the eager pass.
"""

from __future__ import annotations

import logging
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import SiLUActivation
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from minicpmo_cli.errors import describe_error
from minicpmo_cli.generation.forward import any_hooked

logger = logging.getLogger(__name__)

PER_LAYER = 12  # weights per layer in the order of ``layer_weights``
ROTARY_PROBES = (1, 7, 40)  # prompt lengths the scripted rotary is checked on against the model's


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``forward._rms_norm`` (``Qwen2RMSNorm.forward`` without its no-op casts)."""
    float32 = x.dtype == torch.float32
    h = x if float32 else x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * (h if float32 else h.to(x.dtype))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``forward._rotate_half_form``."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _repeat_kv(states: Tensor, groups: int) -> Tensor:
    """``forward._repeat_kv``."""
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def _attend(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], groups: int,
            scaling: float) -> Tensor:
    """``forward.attend`` (transformers' sdpa call for Qwen2), ``[B, q, H*D]``."""
    q_len = query.shape[2]
    gqa = False
    if groups > 1:
        if mask is None and key.shape[-1] <= 256:
            gqa = True
        elif q_len == 1:
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[3])
        else:
            key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = q_len > 1 and mask is None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, is_causal=causal,
                                         enable_gqa=gqa)
    out = out.reshape(out.shape[0], -1, q_len, value.shape[-1]).transpose(1, 2).contiguous()
    return out.reshape(out.shape[0], q_len, -1).contiguous()


def _rotary(positions: Tensor, inv_freq: Tensor, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """transformers' default ``Qwen2RotaryEmbedding.forward`` (checked against it when compiled)."""
    freqs = positions[..., None].float() * inv_freq.to(dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * scaling
    sin = emb.sin() * scaling
    return cos.to(dtype=dtype), sin.to(dtype=dtype)


def _prompt_pass(hidden: Tensor, begin: int, rotary: List[Tensor], rotary_scaling: float, weights: List[Tensor],
                 keys: List[Tensor], values: List[Tensor], slot: int, final_norm: Tensor, lm_head: Tensor,
                 lm_bias: Optional[Tensor], eps: float, head_dim: int, groups: int,
                 scaling: float) -> tuple[Tensor, Tensor]:
    """The engine's ``_prefill_parts`` + ``forward.forward`` over a slot of the pool (``keys``/``values``
    ``[slots, KVH, capacity, D]`` per layer): positions ``[begin, begin + n)`` of ``hidden`` ``[1, n, D]``
    written into ``slot``, attending causally over the slot's past. ``rotary``: the inverse frequencies (computed
    here) or the cos and sin made by the model's rotary module. The final norm's hidden states ``[1, n, D]``
    and the float32 logits ``[1, V]`` of the last position."""
    n = hidden.shape[1]
    end = begin + n
    index = torch.arange(begin, end, device=hidden.device)
    positions = index[None]
    mask: Optional[Tensor] = None
    if begin > 0:
        mask = (torch.arange(end, device=hidden.device)[None, :] <= positions[0, :, None])[None, None]
    if len(rotary) == 1:
        cos, sin = _rotary(positions, rotary[0], rotary_scaling, hidden.dtype)
    else:
        cos, sin = rotary[0], rotary[1]
    shape = [hidden.shape[0], n, -1, head_dim]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for layer in range(len(keys)):
        w = weights[layer * 12:(layer + 1) * 12]  # PER_LAYER (a script cannot read a global)
        residual = hidden
        x = _rms(hidden, w[0], eps)
        q = F.linear(x, w[1], w[2]).view(shape).transpose(1, 2)
        k = F.linear(x, w[3], w[4]).view(shape).transpose(1, 2)
        v = F.linear(x, w[5], w[6]).view(shape).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        slot_keys, slot_values = keys[layer][slot:slot + 1], values[layer][slot:slot + 1]
        slot_keys.index_copy_(2, index, k)
        slot_values.index_copy_(2, index, v)
        attended = _attend(q, slot_keys.narrow(2, 0, end), slot_values.narrow(2, 0, end), mask, groups, scaling)
        hidden = residual + F.linear(attended, w[7])
        x = _rms(hidden, w[8], eps)
        hidden = hidden + F.linear(F.silu(F.linear(x, w[9])) * F.linear(x, w[10]), w[11])
    hidden = _rms(hidden, final_norm, eps)
    return hidden, F.linear(hidden[:, -1:], lm_head, lm_bias).float()[:, -1]


def _prompt_passes(hiddens: List[Tensor], begins: List[int], slots: List[int], inv_freq: Tensor,
                   rotary_scaling: float, weights: List[Tensor], keys: List[Tensor], values: List[Tensor],
                   final_norm: Tensor, lm_head: Tensor, lm_bias: Optional[Tensor], eps: float, head_dim: int,
                   groups: int, scaling: float) -> List[tuple[Tensor, Tensor]]:
    """:func:`_prompt_pass` for several prompt chunks in turn (each into its own slot), in one call."""
    made: List[tuple[Tensor, Tensor]] = []
    for index in range(len(hiddens)):
        made.append(_prompt_pass(hiddens[index], begins[index], [inv_freq], rotary_scaling, weights, keys, values,
                                 slots[index], final_norm, lm_head, lm_bias, eps, head_dim, groups, scaling))
    return made


def layer_weights(llm) -> list[Tensor] | None:
    """The decoder's weights in ``_layers``' order, or None when a layer is of a kind it does not compute
    (quantized linears, other norms or activations, biases where Qwen2 has none) or has forward hooks."""
    weights = []
    for layer in llm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(m) is not nn.Linear for m in linears) or any(type(m) is not Qwen2RMSNorm for m in norms):
            return None
        if type(mlp.act_fn) is not SiLUActivation:
            return None
        if any(m.bias is None for m in linears[:3]) or any(m.bias is not None for m in linears[3:]):
            return None
        weights += [norms[0].weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
                    attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, norms[1].weight,
                    mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    norms = [llm.model.norm, *(n for layer in llm.model.layers for n in (layer.input_layernorm,
                                                                         layer.post_attention_layernorm))]
    if type(llm.model.norm) is not Qwen2RMSNorm or len({n.variance_epsilon for n in norms}) != 1:
        return None  # one eps is handed to every norm
    return weights


class ScriptedPrefill:
    """The engine's prompt pass (``_prefill_parts`` and the last position's logits) as one scripted call,
    compiled on first use; ``run`` returns None where the eager pass must run instead (see the module's
    docstring)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self._weights = layer_weights(llm)
        self._fn = self._many = None
        self._failed = self._weights is None or type(llm.lm_head) is not nn.Linear
        self._modules = list(llm.modules())
        self._own_rotary = False  # whether the rotary runs inside the call (it equals the model's)

    def run(self, chunks: list[tuple[Tensor, int, int]], keys: list[Tensor],
            values: list[Tensor]) -> list[tuple[Tensor, Tensor]] | None:
        """For each ``(embeds, slot, begin)`` of ``chunks`` (``embeds`` ``[1, n, D]`` at positions
        ``[begin, begin + n)`` of ``slot``, their keys/values written there, in turn): the final norm's hidden
        states ``[1, n, D]`` and the float32 logits ``[1, V]`` of the last position; None when the eager pass
        must run. One call for all of them (while the rotary runs inside it), so the GIL is let go once."""
        if self._failed or any_hooked(self._modules):
            return None
        if self._fn is None and not self._compile(chunks[0][0]):
            return None
        llm = self.llm
        decoder, attn = llm.model, llm.model.layers[0].self_attn
        rotary = decoder.rotary_emb
        common = (float(rotary.attention_scaling), self._weights, keys, values)
        tail = (decoder.norm.weight, llm.lm_head.weight, llm.lm_head.bias, float(decoder.norm.variance_epsilon),
                int(attn.head_dim), int(attn.num_key_value_groups), float(attn.scaling))
        with torch.jit.optimized_execution(False):  # the plain graph: no profiling runs, no fusion
            if self._own_rotary:
                return self._many([c[0] for c in chunks], [c[2] for c in chunks], [c[1] for c in chunks],
                                  rotary.inv_freq, *common, *tail)
            made = []
            for embeds, slot, begin in chunks:
                positions = torch.arange(begin, begin + embeds.shape[1], device=embeds.device)[None]
                made.append(self._fn(embeds, begin, list(rotary(embeds, positions)), *common, slot, *tail))
            return made

    def _compile(self, like: Tensor) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice: the eager pass is the fallback
                self._fn = torch.jit.script(_prompt_pass)
                self._many = torch.jit.script(_prompt_passes)
                rotary = torch.jit.script(_rotary)
        except Exception as exc:  # noqa: BLE001 - TorchScript cannot compile it here: the eager pass stays
            logger.warning("the prompt pass cannot be scripted (%s); it runs eagerly", describe_error(exc))
            self._failed = True
            return False
        self._own_rotary = self._rotary_matches(rotary, like)
        return True

    def _rotary_matches(self, scripted, like: Tensor) -> bool:
        """Whether the scripted rotary makes the model's own cos/sin bit for bit (the default rope of this
        transformers version); if not, the model's module makes them before each call."""
        module = self.llm.model.rotary_emb
        if getattr(module, "rope_type", "default") != "default":
            return False
        for length in ROTARY_PROBES:
            positions = torch.arange(3, 3 + length, device=like.device)[None]
            with torch.jit.optimized_execution(False):
                mine = scripted(positions, module.inv_freq, float(module.attention_scaling), like.dtype)
            theirs = module(like[:, :1].expand(1, length, like.shape[-1]), positions)
            if not all(torch.equal(a, b) for a, b in zip(mine, theirs)):
                logger.info("the scripted rotary differs from the model's; the model's runs before each prompt")
                return False
        return True
