"""``ConditionalChatTTS``: MiniCPM-o 2.6's speech-token generator (``tts.*`` parameters), with its KV-cache protocol.

Sequence layout (spec audio-tts §3.4): ``[Stts] [spk_emb] <300 reserved text slots> [Ptts]`` (303 positions,
``condition_length``), then one position per generated audio frame (4 codebook ids). The KV cache is a list of
per-layer ``(K, V)`` tensors ``[1, heads, S, head_dim]``: it starts as 302 zero positions (everything but
``[Ptts]``), text chunks are written into it in place by :meth:`prefill_text`, and each audio step appends one
position in :meth:`generate`. Zero positions that are not yet prefilled are hidden by the streaming mask.

The logits processors and samplers that :meth:`generate` uses are in ``tts_sampling.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from minicpmo_cli.model.dvae import DVAE, decode_codes_to_mel
from minicpmo_cli.model.layers import MultiModalProjector
from minicpmo_cli.model.tts_sampling import ReferenceSampler

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

DEFAULT_TEMPERATURES = (0.1, 0.3, 0.1, 0.3)  # hard-coded per codebook in the reference
AUDIO_EOS_ID = 625


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight norm ``W = g * v / ||v||`` (row-wise), checkpoint names
    ``parametrizations.weight.original0`` (g ``[out, 1]``) and ``.original1`` (v ``[out, in]``).

    The normalised weight is computed in float32 and cast, because torch's weight-norm kernel is missing for
    bfloat16 on some builds (pytorch/pytorch#107914). Old-style ``weight_g`` / ``weight_v`` keys are renamed
    on load.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        holder = nn.Module()
        holder.original0 = nn.Parameter(torch.ones(out_features, 1))
        holder.original1 = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(holder.original1, std=0.02)
        self.parametrizations = nn.ModuleDict({"weight": holder})
        self._register_load_state_dict_pre_hook(_rename_weight_norm_keys)

    @property
    def weight(self) -> torch.Tensor:
        holder = self.parametrizations["weight"]
        g = holder.original0.float()
        v = holder.original1.float()
        # Same formula and operation order as torch._weight_norm's reference path: v * (g / ||v||).
        return (v * (g / torch.linalg.vector_norm(v, dim=1, keepdim=True))).to(holder.original1.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


_WEIGHT_NORM_RENAMES = (
    ("weight_g", "parametrizations.weight.original0"),
    ("weight_v", "parametrizations.weight.original1"),
)


def _rename_weight_norm_keys(state_dict, prefix, *args, **kwargs) -> None:
    for old, new in _WEIGHT_NORM_RENAMES:
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def rename_weight_norm_keys(state_dict: dict) -> dict:
    """For loaders that bypass ``load_state_dict``: ``*.weight_g/_v`` -> the parametrization names."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in _WEIGHT_NORM_RENAMES:
            if key.endswith("." + old):
                key = key[: -len(old)] + new
        renamed[key] = value
    return renamed


@dataclass
class TTSGenerationOutput:
    """``new_ids``: all frames generated after position 303 (minus a final EOS frame), ``[1, n, num_vq]``;
    ``audio_input_ids``: the full id buffer for the next call; ``past_key_values``; ``finished`` (EOS drawn)."""

    new_ids: torch.Tensor
    audio_input_ids: torch.Tensor
    past_key_values: KVCache
    finished: bool


def make_streaming_chunk_mask_generation(
    inputs_embeds: torch.Tensor,
    past_seen_tokens: int,
    streaming_tts_text_mask: torch.Tensor,
    streaming_reserved_length: int = 300,
    streaming_audio_chunk_size: int = 50,
    streaming_text_chunk_size: int = 10,
    num_spk_emb: int = 1,
    use_spk_emb: bool = True,
) -> torch.Tensor:
    """Additive mask ``[1, 1, 1, past + n]`` for audio steps (spec §3.6).

    Text slots from ``2 + 10 * ceil((past - 300) / 50)`` up to and including position 302 (``[Ptts]``) are hidden;
    this hides ``[Ptts]`` itself at every step (reference quirk, reproduced), and the pad slots where the text
    mask is 0. A single row is broadcast to all ``n`` new positions (used as-is by ``prefill_audio_ids``).
    """
    if inputs_embeds.shape[0] != 1:
        raise ValueError("the TTS supports batch size 1 only")
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    min_value = torch.finfo(dtype).min
    prefix = 1 + num_spk_emb * int(use_spk_emb)
    mask = torch.zeros((1, past_seen_tokens + inputs_embeds.shape[1]), dtype=dtype, device=device)
    visible_text = min(
        math.ceil((past_seen_tokens - streaming_reserved_length) / streaming_audio_chunk_size)
        * streaming_text_chunk_size,
        streaming_reserved_length,
    )
    mask[0, visible_text + prefix : streaming_reserved_length + prefix + 1] = min_value
    condition = mask[0, : prefix + streaming_reserved_length + 1]
    condition.masked_fill_(streaming_tts_text_mask.to(device) == 0, min_value)
    return mask[None, None]


def _llama_config(tts_config) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=tts_config.hidden_size,
        intermediate_size=tts_config.intermediate_size,
        num_attention_heads=tts_config.num_attention_heads,
        num_hidden_layers=tts_config.num_hidden_layers,
        max_position_embeddings=tts_config.max_position_embeddings,
        attn_implementation=getattr(tts_config, "attn_implementation", "sdpa") or "sdpa",
    )


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into a pre-allocated buffer (doubling when full) instead of concatenating
    on every step, so one audio step costs O(1) copies instead of O(cache length)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 256) -> None:
        super().__init__()
        length = keys.shape[-2]
        self._keys = keys.new_empty((*keys.shape[:-2], length + spare, keys.shape[-1]))
        self._values = values.new_empty((*values.shape[:-2], length + spare, values.shape[-1]))
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self._length = length
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[..., : self._length, :]
        self.values = self._values[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            capacity = max(end, 2 * self._keys.shape[-2])
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                new = old.new_empty((*old.shape[:-2], capacity, old.shape[-1]))
                new[..., : self._length, :] = old[..., : self._length, :]
                setattr(self, name, new)
        self._keys[..., self._length : end, :] = key_states
        self._values[..., self._length : end, :] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


def _to_dynamic_cache(past_key_values: KVCache) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k, v) for k, v in past_key_values]
    return cache


def _from_dynamic_cache(cache: DynamicCache) -> KVCache:
    return [(layer.keys, layer.values) for layer in cache.layers]


class ConditionalChatTTS(nn.Module):
    """The TTS of MiniCPM-o 2.6 (``tts.*``): projector, code/text embeddings, weight-normed code heads, a
    Llama decoder (``transformers.LlamaModel``) and the DVAE. Batch size 1 only, as the reference."""

    def __init__(self, tts_config) -> None:
        super().__init__()
        self.config = tts_config
        if not tts_config.use_speaker_embedding:
            raise NotImplementedError("ConditionalChatTTS needs use_speaker_embedding=True (as the reference)")
        self.num_spk_embs = int(tts_config.num_spk_embs)
        self.spk_emb_token_id = int(tts_config.spk_emb_token_id)
        self.audio_bos_token_id = int(tts_config.audio_bos_token_id)
        self.streaming_text_chunk_size = int(tts_config.streaming_text_chunk_size)
        # The reference never plumbs streaming_audio_chunk_size: its mask uses the default 50.
        self.streaming_audio_chunk_size = 50
        self.streaming_text_reserved_len = int(tts_config.streaming_text_reserved_len)
        self.num_vq = int(tts_config.num_vq)
        self.num_audio_tokens = int(tts_config.num_audio_tokens)
        self.top_p = tts_config.top_p
        self.top_k = tts_config.top_k
        self.repetition_penalty = tts_config.repetition_penalty
        hidden = tts_config.hidden_size
        if tts_config.use_mlp:
            self.projector = MultiModalProjector(tts_config.llm_dim, hidden)
        else:
            self.projector = nn.Linear(tts_config.llm_dim, hidden, bias=False)
        self.emb_code = nn.ModuleList([nn.Embedding(self.num_audio_tokens, hidden) for _ in range(self.num_vq)])
        self.emb_text = nn.Embedding(tts_config.num_text_tokens, hidden)
        self.head_code = nn.ModuleList(
            [WeightNormLinear(hidden, self.num_audio_tokens) for _ in range(self.num_vq)]
        )
        self.dvae = DVAE(tts_config)
        self.model = LlamaModel(_llama_config(tts_config))

    # ----- layout helpers -------------------------------------------------------------------------------
    @property
    def condition_length(self) -> int:
        """``[Stts]`` + spk slots + reserved text + ``[Ptts]`` = 303 with the official config."""
        return 1 + self.num_spk_embs + self.streaming_text_reserved_len + 1

    @property
    def device(self) -> torch.device:
        return self.emb_text.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb_text.weight.dtype

    def new_kv_cache(self) -> KVCache:
        """Zero cache over every condition position but ``[Ptts]`` (302 with the official config)."""
        cfg = self.model.config
        shape = (1, cfg.num_attention_heads, self.condition_length - 1, cfg.hidden_size // cfg.num_attention_heads)
        zeros = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return [(zeros(), zeros()) for _ in range(cfg.num_hidden_layers)]

    def new_audio_input_ids(self) -> torch.Tensor:
        return torch.zeros(1, self.condition_length, self.num_vq, dtype=torch.long, device=self.device)

    # ----- embeddings -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def merge_inputs_embeds(self, input_ids: torch.Tensor, lm_spk_emb_last_hidden_states=None) -> torch.Tensor:
        """Text embeddings with the L2-normalised projected LLM ``<|spk|>`` state at the ``[spk_emb]`` slot(s)."""
        if input_ids.shape[0] != 1:
            raise ValueError("the TTS supports batch size 1 only")
        inputs_embeds = self.emb_text(input_ids)
        spk_positions = (input_ids[0] == self.spk_emb_token_id).nonzero().flatten()
        if spk_positions.numel() == 0:
            return inputs_embeds
        if spk_positions.numel() != self.num_spk_embs:
            raise ValueError(f"expected {self.num_spk_embs} [spk_emb] slot(s), got {spk_positions.numel()}")
        if lm_spk_emb_last_hidden_states is None:
            raise ValueError("[spk_emb] present but no speaker embedding given")
        spk = lm_spk_emb_last_hidden_states.to(device=self.device, dtype=self.projector_dtype)
        spk = F.normalize(self.projector(spk.reshape(-1, spk.shape[-1])), p=2, dim=-1)
        start, stop = int(spk_positions.min()), int(spk_positions.max()) + 1
        inputs_embeds[0, start:stop] = spk.to(inputs_embeds.dtype)
        return inputs_embeds

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def _embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[1, n, num_vq]`` -> summed code embeddings ``[1, n, hidden]`` (stack-then-sum, as the
        reference, so float rounding matches)."""
        embeds = [self.emb_code[q](codes[:, :, q]) for q in range(self.num_vq)]
        return torch.stack(embeds, 3).sum(3)

    def _bos_embeds(self) -> torch.Tensor:
        return self.emb_text(torch.tensor([[self.audio_bos_token_id]], dtype=torch.long, device=self.device))

    def _streaming_mask(self, inputs_embeds, past_len: int, text_mask: torch.Tensor) -> torch.Tensor:
        return make_streaming_chunk_mask_generation(
            inputs_embeds=inputs_embeds,
            past_seen_tokens=past_len,
            streaming_tts_text_mask=text_mask,
            streaming_reserved_length=self.streaming_text_reserved_len,
            streaming_audio_chunk_size=self.streaming_audio_chunk_size,
            streaming_text_chunk_size=self.streaming_text_chunk_size,
            num_spk_emb=self.num_spk_embs,
        )

    # ----- cache protocol -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_text(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: KVCache,
        lm_spk_emb_last_hidden_states: torch.Tensor | None = None,
    ) -> KVCache:
        """Run text tokens at ``position_ids`` (contiguous ``[begin, end)``) with plain causal attention over
        ``[0, end)`` and write their K/V into ``past_key_values`` in place (positions >= end stay zero)."""
        position_ids = position_ids.reshape(1, -1).to(self.device)
        begin, end = int(position_ids[0, 0]), int(position_ids[0, -1]) + 1
        inputs_embeds = self.merge_inputs_embeds(input_ids.to(self.device), lm_spk_emb_last_hidden_states)
        cache = _to_dynamic_cache([(k[:, :, :begin].clone(), v[:, :, :begin].clone()) for k, v in past_key_values])
        self.model(inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache, use_cache=True)
        for (keys, values), layer in zip(past_key_values, cache.layers):
            keys[:, :, begin:end] = layer.keys[:, :, begin:end]
            values[:, :, begin:end] = layer.values[:, :, begin:end]
        return past_key_values

    @torch.inference_mode()
    def prefill_audio_ids(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache,
        streaming_tts_text_mask: torch.Tensor,
        add_audio_bos: bool = True,
    ) -> KVCache:
        """Append ``[Ptts]`` + audio frames ``[1, n, num_vq]`` to the cache (used when a streaming segment is
        continued). Reference quirk, reproduced: one mask row is broadcast to all new rows, so these frames
        attend to each other bidirectionally."""
        inputs_embeds = self._embed_codes(input_ids.to(self.device))
        if add_audio_bos:
            inputs_embeds = torch.cat([self._bos_embeds(), inputs_embeds], dim=1)
        past_len = past_key_values[0][0].shape[2]
        position_ids = torch.arange(past_len, past_len + inputs_embeds.shape[1], device=self.device)[None]
        mask = self._streaming_mask(inputs_embeds, past_len, streaming_tts_text_mask)
        cache = _to_dynamic_cache(past_key_values)
        self.model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        return _from_dynamic_cache(cache)

    @torch.inference_mode()
    def code_logits(self, hidden_states: torch.Tensor, head_weights: list | None = None) -> torch.Tensor:
        """Last hidden state ``[1, hidden]`` -> raw float32 logits ``[num_vq, num_audio_tokens]``.
        ``head_weights``: the normalised head weights, precomputed once per ``generate`` call."""
        if head_weights is None:
            head_weights = [head.weight for head in self.head_code]
        logits = torch.stack([F.linear(hidden_states, w.to(hidden_states.dtype)) for w in head_weights], dim=1)
        return logits.float().reshape(-1, self.num_audio_tokens)

    def _step_hidden(self, audio_ids: torch.Tensor, cache: DynamicCache, text_mask: torch.Tensor) -> torch.Tensor:
        """One decoding step: input is ``[Ptts]`` at the BOS step, else the previous frame's code sum."""
        past_len = cache.get_seq_length()
        if audio_ids.shape[1] == self.condition_length:
            inputs_embeds = self._bos_embeds()
        else:
            inputs_embeds = self._embed_codes(audio_ids[:, -1:])
        position_ids = torch.tensor([[past_len]], dtype=torch.long, device=self.device)
        mask = self._streaming_mask(inputs_embeds, past_len, text_mask)
        out = self.model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        return out.last_hidden_state[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache,
        temperature: torch.Tensor | Sequence[float] = DEFAULT_TEMPERATURES,
        eos_token: int | torch.Tensor = AUDIO_EOS_ID,
        streaming_tts_text_mask: torch.Tensor | None = None,
        force_no_stop: bool = False,
        min_new_token: int = 10,
        max_new_token: int = 50,
        logits_warpers: Sequence = (),
        logits_processors: Sequence = (),
        sampler=None,
        logits_out: list | None = None,
    ) -> TTSGenerationOutput:
        """Sample up to ``max_new_token`` audio frames after ``input_ids`` (``[1, cache_len + 1, num_vq]``).

        Per step: raw logits / per-codebook temperature; processors and warpers are skipped on the BOS step (as
        the reference); EOS is banned for the first ``min_new_token`` steps *of this call*; one multinomial
        draw per codebook; a frame with EOS in any codebook ends generation. ``logits_out`` (a list) receives
        the raw logits of every step when given. ``sampler``: object with ``sample(probs) -> [rows, 1]``;
        default :class:`ReferenceSampler` on torch's global RNG (reference-exact draws).
        """
        sampler = sampler if sampler is not None else ReferenceSampler()
        if input_ids.shape[0] != 1:
            raise ValueError("the TTS supports batch size 1 only")
        if streaming_tts_text_mask is None:
            streaming_tts_text_mask = torch.ones(self.condition_length, dtype=torch.int8)
        temps = torch.as_tensor(temperature, dtype=torch.float, device=self.device).reshape(-1, 1)
        eos = int(eos_token.reshape(-1)[0]) if isinstance(eos_token, torch.Tensor) else int(eos_token)
        start = self.condition_length
        progress = input_ids.shape[1]
        buffer, cache = self._start_generation(input_ids, past_key_values, max_new_token)
        finished = False
        head_weights = [head.weight for head in self.head_code]
        for step in range(max_new_token):
            is_bos = progress == start
            hidden = self._step_hidden(buffer[:, :progress], cache, streaming_tts_text_mask)
            logits = self.code_logits(hidden, head_weights)
            if logits_out is not None:
                logits_out.append(logits.clone())
            history = buffer[:, start:progress].permute(0, 2, 1).reshape(self.num_vq, -1)
            processors = () if is_bos else (*logits_processors, *logits_warpers)
            banned = eos if step < min_new_token or force_no_stop else None
            next_frame = self._sample_frame(logits, temps, history, processors, banned, sampler)
            finished = bool(next_frame.eq(eos).any())
            buffer[:, progress] = next_frame
            if step == 0 and finished:
                # Reference quirk, reproduced: an EOS on the first step of a call breaks before ``progress``
                # advances, so the EOS frame is not kept and the ``[:-1]`` below drops one real frame.
                break
            progress += 1
            if finished:
                break
        audio_input_ids = buffer[:, :progress]
        new_ids = audio_input_ids[:, start:-1] if finished else audio_input_ids[:, start:]
        return TTSGenerationOutput(new_ids, audio_input_ids, _from_dynamic_cache(cache), finished)

    def _start_generation(self, input_ids: torch.Tensor, past_key_values: KVCache, max_new_token: int):
        """The id buffer ``[1, len + max_new_token, num_vq]`` holding ``input_ids``, and the cache to extend."""
        progress = input_ids.shape[1]
        buffer = torch.zeros(1, progress + max_new_token, self.num_vq, dtype=torch.long, device=self.device)
        buffer[:, :progress] = input_ids.to(self.device)
        cache = _to_dynamic_cache(past_key_values)
        if progress != cache.get_seq_length() + 1:
            raise ValueError(f"audio_input_ids length {progress} != KV-cache length + 1 ({cache.get_seq_length() + 1})")
        return buffer, cache

    def _sample_frame(self, logits, temps, history, processors, banned_token: int | None, sampler) -> torch.Tensor:
        """Raw logits ``[num_vq, codes]`` -> one frame ``[1, num_vq]``: divide by the per-codebook temperature,
        apply the processors then warpers, ban ``banned_token`` (EOS before ``min_new_token``), draw."""
        logits = logits / temps
        for processor in processors:
            logits = processor(history, logits)
        if banned_token is not None:
            logits[:, banned_token] = -torch.inf
        probs = F.softmax(logits, dim=-1)
        return sampler.sample(probs).view(1, self.num_vq)

    @torch.inference_mode()
    def decode_to_mel_specs(self, result_list) -> torch.Tensor:
        """Audio codes (``[B, T, num_vq]`` or a list of ``[T_i, num_vq]``) -> DVAE log-mel ``[B, 100, 2T]``."""
        return decode_codes_to_mel(self.dvae, result_list)
