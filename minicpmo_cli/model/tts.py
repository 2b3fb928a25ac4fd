"""``ConditionalChatTTS``: MiniCPM-o 2.6's speech-token generator (``tts.*`` parameters): its modules, input
embeddings, code heads and the streaming attention mask.

Sequence layout (spec audio-tts §3.4): ``[Stts] [spk_emb] <300 reserved text slots> [Ptts]`` (303 positions,
``condition_length``), then one position per generated audio frame (4 codebook ids). The decode itself (KV
cache, text prefill, the frame loop) is generation/tts_decode.py, on the decoding core's static cache and
per-layer forward; the logits processors and samplers it uses are in ``tts_sampling.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

from minicpmo_cli.model.dvae import DVAE, decode_codes_to_mel
from minicpmo_cli.model.layers import MultiModalProjector

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
    mask is 0. A single row is broadcast to all ``n`` new positions (used as-is when a streaming segment's
    primer frames are prefilled).
    """
    if inputs_embeds.shape[0] != 1:
        raise ValueError("the TTS supports batch size 1 only")
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    min_value = torch.finfo(dtype).min
    prefix = 1 + num_spk_emb * int(use_spk_emb)
    mask = torch.zeros((1, past_seen_tokens + inputs_embeds.shape[1]), dtype=dtype, device=device)
    visible_text = _visible_text(past_seen_tokens, streaming_reserved_length, streaming_audio_chunk_size,
                                 streaming_text_chunk_size)
    mask[0, visible_text + prefix : streaming_reserved_length + prefix + 1] = min_value
    condition = mask[0, : prefix + streaming_reserved_length + 1]
    condition.masked_fill_(streaming_tts_text_mask.to(device) == 0, min_value)
    return mask[None, None]


def _visible_text(past_seen_tokens: int, reserved: int, audio_chunk: int, text_chunk: int) -> int:
    return min(math.ceil((past_seen_tokens - reserved) / audio_chunk) * text_chunk, reserved)


def visible_text_slots(tts, past_seen_tokens: int) -> int:
    """How many text slots an audio step after ``past_seen_tokens`` positions sees (the streaming mask only
    changes when this does: every 50 frames)."""
    return _visible_text(past_seen_tokens, tts.streaming_text_reserved_len, tts.streaming_audio_chunk_size,
                         tts.streaming_text_chunk_size)


def _llama_config(tts_config) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=tts_config.hidden_size,
        intermediate_size=tts_config.intermediate_size,
        num_attention_heads=tts_config.num_attention_heads,
        num_hidden_layers=tts_config.num_hidden_layers,
        max_position_embeddings=tts_config.max_position_embeddings,
        attn_implementation=getattr(tts_config, "attn_implementation", "sdpa") or "sdpa",
    )


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

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[1, n, num_vq]`` -> summed code embeddings ``[1, n, hidden]`` (stack-then-sum, as the
        reference, so float rounding matches)."""
        embeds = [self.emb_code[q](codes[:, :, q]) for q in range(self.num_vq)]
        return torch.stack(embeds, 3).sum(3)

    def bos_embeds(self) -> torch.Tensor:
        return self.emb_text(torch.tensor([[self.audio_bos_token_id]], dtype=torch.long, device=self.device))

    def streaming_mask(self, inputs_embeds, past_len: int, text_mask: torch.Tensor) -> torch.Tensor:
        return make_streaming_chunk_mask_generation(
            inputs_embeds=inputs_embeds,
            past_seen_tokens=past_len,
            streaming_tts_text_mask=text_mask,
            streaming_reserved_length=self.streaming_text_reserved_len,
            streaming_audio_chunk_size=self.streaming_audio_chunk_size,
            streaming_text_chunk_size=self.streaming_text_chunk_size,
            num_spk_emb=self.num_spk_embs,
        )

    # ----- decoding (the frame loop itself is generation/tts_decode.py) ----------------------------------
    @torch.inference_mode()
    def code_logits(self, hidden_states: torch.Tensor, head_weights: list | None = None) -> torch.Tensor:
        """Last hidden state ``[1, hidden]`` -> raw float32 logits ``[num_vq, num_audio_tokens]``.
        ``head_weights``: the normalised head weights, precomputed once per ``generate`` call."""
        if head_weights is None:
            head_weights = [head.weight for head in self.head_code]
        logits = torch.stack([F.linear(hidden_states, w.to(hidden_states.dtype)) for w in head_weights], dim=1)
        return logits.float().reshape(-1, self.num_audio_tokens)

    @torch.inference_mode()
    def decode_to_mel_specs(self, result_list) -> torch.Tensor:
        """Audio codes (``[B, T, num_vq]`` or a list of ``[T_i, num_vq]``) -> DVAE log-mel ``[B, 100, 2T]``."""
        return decode_codes_to_mel(self.dvae, result_list)
