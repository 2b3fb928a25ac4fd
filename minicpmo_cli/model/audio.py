"""Whisper-medium audio encoder (``apm.*``) and MiniCPM-o 2.6's audio-embedding paths (spec audio-tts §1.5-1.6, §2.4).

Written on plain torch (SDPA) instead of transformers' Whisper classes: the stock ``WhisperEncoder.forward``
insists on 3000-frame inputs and its attention's cache API changes between releases, while this encoder must
take short inputs, an additive chunk mask and an explicit key/value cache with a position offset.
Parameter names and shapes are the checkpoint's (``conv1``, ``conv2``, ``embed_positions``,
``layers.N.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``,
``layer_norm``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

logger = logging.getLogger(__name__)

ENCODER_FRAMES_PER_SECOND = 50  # 100 mel frames/s halved by conv2's stride


@dataclass
class WhisperEncoderCache:
    """Per-layer self-attention keys/values ``[B, heads, T, head_dim]`` of the audio already encoded."""

    key_values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def get_seq_length(self) -> int:
        return 0 if not self.key_values else self.key_values[0][0].shape[2]

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        """Append the new chunk's keys/values for one layer; return everything cached for that layer."""
        if layer_idx < len(self.key_values):
            old_k, old_v = self.key_values[layer_idx]
            keys, values = torch.cat([old_k, keys], dim=2), torch.cat([old_v, values], dim=2)
            self.key_values[layer_idx] = (keys, values)
        else:
            self.key_values.append((keys, values))
        return keys, values


@dataclass
class WhisperEncoderOutput:
    """Encoder result. Our own container: transformers 5.x renames ``past_key_values`` on its output classes."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    past_key_values: WhisperEncoderCache | None = None


class MiniCPMWhisperAttention(nn.Module):
    """Whisper self-attention: k_proj has no bias; SDPA with default 1/sqrt(head_dim) scaling."""

    def __init__(self, embed_dim: int, num_heads: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, cache: WhisperEncoderCache | None = None):
        query = self._heads(self.q_proj(hidden_states))
        key = self._heads(self.k_proj(hidden_states))
        value = self._heads(self.v_proj(hidden_states))
        if cache is not None:
            # New queries see every cached frame plus their own chunk, unmasked (as the reference's cache path).
            key, value = cache.update(self.layer_idx, key, value)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MiniCPMWhisperEncoderLayer(nn.Module):
    """Pre-LN Whisper encoder layer (LayerNorm eps 1e-5, torch default)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = MiniCPMWhisperAttention(dim, config.encoder_attention_heads, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.activation_fn = ACT2FN[config.activation_function]
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states, attention_mask=None, cache: WhisperEncoderCache | None = None):
        hidden_states = hidden_states + self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask, cache)
        residual = hidden_states
        hidden_states = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
        hidden_states = residual + hidden_states
        if hidden_states.dtype == torch.float16:
            # fp16 overflow guard of the reference: only changes +-inf, finite values are already in range.
            limit = torch.finfo(torch.float16).max - 1000
            hidden_states = hidden_states.clamp(min=-limit, max=limit)
        return hidden_states


class MiniCPMWhisperEncoder(nn.Module):
    """Whisper encoder taking any number of mel frames, an additive mask and an optional streaming cache."""

    def __init__(self, audio_config) -> None:
        super().__init__()
        self.config = audio_config
        dim = audio_config.d_model
        self.conv1 = nn.Conv1d(audio_config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(audio_config.max_source_positions, dim)
        self.layers = nn.ModuleList(
            [MiniCPMWhisperEncoderLayer(audio_config, i) for i in range(audio_config.encoder_layers)]
        )
        self.layer_norm = nn.LayerNorm(dim)

    @property
    def max_positions(self) -> int:
        return self.embed_positions.weight.shape[0]

    def _position_embeddings(self, length: int, offset: int) -> torch.Tensor:
        table = self.embed_positions.weight
        if offset + length <= table.shape[0]:
            return table[offset : offset + length]
        # Reference quirk: past the 1500-entry table the last position vector is repeated.
        logger.warning("audio context longer than %d encoder frames: repeating the last position", table.shape[0])
        front = table[offset:]
        return torch.cat([front, table[-1:].expand(length - front.shape[0], -1)], dim=0)

    def embed(self, input_features: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        """conv1 -> GELU -> conv2 (stride 2) -> GELU, plus positions ``offset .. offset+T``; [B, T_enc, D]."""
        weight = self.conv1.weight
        x = input_features.to(dtype=weight.dtype, device=weight.device)
        # One row at a time: the convolution backend picks its algorithm by batch size, so a batched conv
        # differs from the single-row one in the last bits (seen on the CPU); the layers after it do not, and
        # a row's result must not depend on the rows beside it (batched asr equals one by one).
        x = torch.cat([F.gelu(self.conv2(F.gelu(self.conv1(row[None])))) for row in x]).permute(0, 2, 1)
        return x + self._position_embeddings(x.shape[1], position_offset)

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: WhisperEncoderCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> WhisperEncoderOutput:
        """Encode ``input_features [B, 80, T_mel]``.

        ``attention_mask`` is additive ``[B, 1, T_enc, T_enc + cached]`` (0 allowed, -inf masked) or None.
        With ``use_cache`` the keys/values are appended to ``past_key_values`` (created when None) and the
        positions continue after the cached length; the updated cache is returned in ``past_key_values``.
        """
        cache = (past_key_values if past_key_values is not None else WhisperEncoderCache()) if use_cache else None
        offset = cache.get_seq_length() if cache is not None else 0
        hidden_states = self.embed(input_features, offset)
        if attention_mask is not None:
            attention_mask = attention_mask.to(dtype=hidden_states.dtype, device=hidden_states.device)
        all_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_states is not None:
                all_states.append(hidden_states)
            hidden_states = layer(hidden_states, attention_mask, cache)
        hidden_states = self.layer_norm(hidden_states)
        if all_states is not None:
            all_states.append(hidden_states)  # hidden_states[-1] is after the final LayerNorm, as the reference
        return WhisperEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_states) if all_states is not None else None,
            past_key_values=cache,
        )


# ---------------------------------------------------------------------------------------------- masks
def subsequent_chunk_mask(size: int, chunk_size: int, device=None) -> torch.Tensor:
    """Bool [size, size]: query i may see keys [0, min((i // chunk + 1) * chunk, size)) (all earlier chunks)."""
    chunk_end = (torch.arange(size, device=device) // chunk_size + 1) * chunk_size
    return torch.arange(size, device=device)[None, :] < chunk_end.clamp(max=size)[:, None]


def build_audio_attention_mask(
    audio_feature_lens: torch.Tensor, max_mel_frames: int, chunk_length: float, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """Additive mask [B, 1, T_enc, T_enc] of the reference's non-streaming path.

    Reference quirk, kept on purpose: the padding test compares *encoder* frame indices with *mel* lengths
    (``j >= mel_len``), so a padded row masks less than its true padding; it only matters when a batch mixes
    pieces of different lengths, and the model was trained with the same code.
    """
    lens = audio_feature_lens.to(device)
    batch = lens.shape[0]
    max_enc = (max_mel_frames - 1) // 2 + 1
    blocked = torch.arange(max_enc, device=device)[None, :] >= lens[:, None]  # [B, T_enc] keys
    blocked = blocked[:, None, None, :].expand(batch, 1, max_enc, max_enc)
    if chunk_length > 0:
        chunk = int(chunk_length * ENCODER_FRAMES_PER_SECOND)
        blocked = blocked | ~subsequent_chunk_mask(max_enc, chunk, device=device)
    mask = torch.zeros(batch, 1, max_enc, max_enc, dtype=dtype, device=device)
    return mask.masked_fill(blocked, float("-inf"))


# ------------------------------------------------------------------------------------------ embeddings
def _flatten_lens(audio_feature_lens) -> tuple[torch.Tensor, list[int]]:
    """All pieces' mel lengths as one int64 tensor, plus how many pieces each sample has."""
    flat: list[int] = []
    counts: list[int] = []
    for item in audio_feature_lens:
        values = item.reshape(-1).tolist() if isinstance(item, torch.Tensor) else [int(v) for v in item]
        flat.extend(int(v) for v in values)
        counts.append(len(values))
    return torch.tensor(flat, dtype=torch.int64), counts


def identical_length_groups(audio_feature_lens) -> list[tuple[list[int], list[int], int]]:
    """Samples whose pieces have exactly the same mel lengths, as (sample indices, feature rows, mel frames).

    Only such samples may share one Whisper call without changing their embeddings: the reference's padding
    mask compares encoder frame indices with *mel* lengths, so padding leaks into a partial last 1 s chunk
    (see :func:`build_audio_attention_mask`); between rows of equal lengths there is no padding to leak.
    Samples without audio are left out; groups come in the order of their first sample.
    """
    groups: dict[tuple[int, ...], tuple[list[int], list[int], int]] = {}
    row = 0
    for index, item in enumerate(audio_feature_lens):
        lens = tuple(int(v) for v in (item.reshape(-1).tolist() if isinstance(item, torch.Tensor) else item))
        if lens:
            samples, rows, _ = groups.setdefault(lens, ([], [], max(lens)))
            samples.append(index)
            rows.extend(range(row, row + len(lens)))
        row += len(lens)
    return list(groups.values())


def _pooled_lengths(mel_lens: torch.Tensor, pool_step: int) -> torch.Tensor:
    encoder_lens = (mel_lens - 1) // 2 + 1
    return (encoder_lens - pool_step) // pool_step + 1


def _project_pool_and_split(audio_states, audio_projection_layer, audio_avg_pooler, mel_lens, counts):
    """Projection -> AvgPool1d over time -> keep each piece's valid tokens -> regroup per sample."""
    embeds = audio_projection_layer(audio_states)
    embeds = audio_avg_pooler(embeds.transpose(1, 2)).transpose(1, 2)
    kernel = audio_avg_pooler.kernel_size
    tokens = _pooled_lengths(mel_lens, kernel[0] if isinstance(kernel, tuple) else kernel).tolist()
    grouped: list[list[torch.Tensor]] = []
    row = 0
    for count in counts:
        grouped.append([embeds[row + k, : tokens[row + k], :] for k in range(count)])
        row += count
    return grouped


def get_audio_embedding(
    apm: MiniCPMWhisperEncoder,
    audio_projection_layer: nn.Module,
    audio_avg_pooler: nn.Module,
    audio_features,
    audio_feature_lens,
    chunk_length: float = 1.0,
    dtype: torch.dtype | None = None,
) -> list[list[torch.Tensor]]:
    """Non-streaming audio embeddings, as the reference's ``get_audio_embedding``.

    ``audio_features [N, 80, T]`` (rows = pieces of all samples in order), ``audio_feature_lens`` one 1-D
    tensor of mel lengths per sample. Whisper runs over all rows at once under the padding + ``chunk_length``
    block-causal mask (``chunk_length <= 0``: padding mask only), then projection and pooling. Returns, per
    sample, a list with one ``[tokens, hidden]`` tensor per piece (``[]`` when there is no audio at all).
    """
    if audio_features is None or len(audio_features) == 0:
        return []
    dtype = dtype or apm.conv1.weight.dtype
    device = apm.conv1.weight.device
    mel_lens, counts = _flatten_lens(audio_feature_lens)
    mask = build_audio_attention_mask(mel_lens, audio_features.shape[-1], chunk_length, dtype, device)
    states = apm(audio_features.to(device=device, dtype=dtype), attention_mask=mask).last_hidden_state
    return _project_pool_and_split(states, audio_projection_layer, audio_avg_pooler, mel_lens, counts)


def get_audio_embedding_streaming(
    apm: MiniCPMWhisperEncoder,
    audio_projection_layer: nn.Module,
    audio_avg_pooler: nn.Module,
    audio_features,
    audio_feature_lens,
    past_key_values: WhisperEncoderCache | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[list[torch.Tensor]], WhisperEncoderCache | None]:
    """Streaming audio embeddings with the encoder KV cache, as the reference's ``get_audio_embedding_streaming``.

    Batch size 1 (one row of features). The new frames attend, without any mask, to every cached frame and
    to all of their own frames; positions continue after the cached length. When ``cached + new >= 1500``
    encoder positions the cache is dropped first (with a warning), so one turn keeps < 30 s of context.
    Returns ``(embeddings per sample/piece, updated cache)``; the caller keeps the cache between calls
    (the reference's ``audio_past_key_values``) and resets it where the reference does.

    Where it legitimately differs from :func:`get_audio_embedding` on the same audio:
    - the features of each streamed piece are normalised (max - 8 clamp) and STFT-padded on their own,
      not over the whole <= 30 s window;
    - conv1/conv2 zero-pad at every piece boundary instead of seeing the neighbouring frames, so the frames
      at a boundary (and, through attention, the rest of the context after it) differ;
    - inside a piece attention is fully bidirectional; with 1 s pieces this is exactly the 1 s chunk mask.
    A single piece encoded from an empty cache equals the non-streaming result for that piece alone.
    """
    if audio_features is None or len(audio_features) == 0:
        return [], past_key_values
    if audio_features.shape[0] != 1:
        raise ValueError(f"streaming audio encoding takes one piece at a time, got {audio_features.shape[0]}")
    dtype = dtype or apm.conv1.weight.dtype
    new_frames = (audio_features.shape[-1] - 1) // 2 + 1
    if past_key_values is not None and past_key_values.get_seq_length() + new_frames >= apm.max_positions:
        logger.warning(
            "audio encoder cache length %d exceeds %d positions, reset",
            past_key_values.get_seq_length() + new_frames,
            apm.max_positions,
        )
        past_key_values = None
    device = apm.conv1.weight.device
    out = apm(audio_features.to(device=device, dtype=dtype), past_key_values=past_key_values, use_cache=True)
    mel_lens, counts = _flatten_lens(audio_feature_lens)
    grouped = _project_pool_and_split(out.last_hidden_state, audio_projection_layer, audio_avg_pooler, mel_lens, counts)
    return grouped, out.past_key_values


def get_audio_embedding_rows(
    apm: MiniCPMWhisperEncoder,
    audio_projection_layer: nn.Module,
    audio_avg_pooler: nn.Module,
    audio_features: torch.Tensor,
    mel_lens: list[int],
    chunk_length: float = 1.0,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """The non-streaming embeddings ``[tokens, hidden]`` of each row of ``audio_features [N, 80, T]`` (a
    piece of ``mel_lens[i]`` frames each), every row exactly as :func:`get_audio_embedding` gives it alone.

    Pieces of any lengths share the work that is per position (the projections, MLPs, norms, pooling: one
    call over the padded rows); what looks across positions runs per row on the row's own frames (conv1 ->
    conv2, as :meth:`MiniCPMWhisperEncoder.embed` does anyway, and the attention under the row's own chunk
    mask), so no row sees another's padding and none depends on what it is batched with (the reference's
    padded batch would: see :func:`build_audio_attention_mask`).
    """
    dtype = dtype or apm.conv1.weight.dtype
    device = apm.conv1.weight.device
    features = audio_features.to(device=device, dtype=dtype)
    enc = [encoder_frame_count_of(n) for n in mel_lens]
    hidden = features.new_zeros(len(mel_lens), max(enc), apm.conv1.weight.shape[0])
    for row, (frames, length) in enumerate(zip(mel_lens, enc)):
        hidden[row, :length] = apm.embed(features[row:row + 1, :, :frames])[0]
    # Each row's mask alone (chunk mask over its own encoder frames, no padding to hide) is the top-left
    # corner of the longest row's: built once, sliced per row.
    longest = max(mel_lens)
    whole = build_audio_attention_mask(torch.tensor([longest]), longest, chunk_length, dtype, device)
    masks = [whole[:, :, :length, :length] for length in enc]
    for layer in apm.layers:
        hidden = _layer_over_rows(layer, hidden, masks, enc)
    hidden = apm.layer_norm(hidden)
    embeds = audio_projection_layer(hidden)
    embeds = audio_avg_pooler(embeds.transpose(1, 2)).transpose(1, 2)
    kernel = audio_avg_pooler.kernel_size
    tokens = _pooled_lengths(torch.tensor(mel_lens), kernel[0] if isinstance(kernel, tuple) else kernel).tolist()
    return [embeds[row, :count] for row, count in enumerate(tokens)]


def encoder_frame_count_of(mel_frames: int) -> int:
    return (mel_frames - 1) // 2 + 1


def _layer_over_rows(layer: MiniCPMWhisperEncoderLayer, hidden: torch.Tensor, masks: list[torch.Tensor],
                     lengths: list[int]) -> torch.Tensor:
    """:meth:`MiniCPMWhisperEncoderLayer.forward` over padded rows, the attention of each row on its own
    ``lengths[i]`` positions under ``masks[i]`` (padding positions: zeros, never read by a real position)."""
    attn = layer.self_attn
    normed = layer.self_attn_layer_norm(hidden)
    query, key, value = (attn._heads(proj(normed)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    mixed = torch.zeros_like(query)
    for row, length in enumerate(lengths):
        part = slice(row, row + 1), slice(None), slice(0, length)
        mixed[part] = F.scaled_dot_product_attention(query[part], key[part], value[part], attn_mask=masks[row])
    batch, _, positions, _ = mixed.shape
    hidden = hidden + attn.out_proj(mixed.transpose(1, 2).reshape(batch, positions, -1))
    residual = hidden
    hidden = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    hidden = residual + hidden
    if hidden.dtype == torch.float16:  # the reference's overflow guard, as the layer's forward
        limit = torch.finfo(torch.float16).max - 1000
        hidden = hidden.clamp(min=-limit, max=limit)
    return hidden
