"""Vision side of MiniCPM-o 2.6: the NaViT-style SigLIP tower (``vpm.*``) and the perceiver resampler
(``resampler.*``), plus :func:`encode_images`, the vision half of the reference's ``get_vllm_embedding``.

Input layout (spec vision-llm §3.1): every slice arrives as a one-row strip ``[3, 14, L*14]`` whose patches
are in raster order of the slice's ``(h, w)`` patch grid; ``tgt_sizes`` carries that grid. The conv over the
strip therefore yields exactly L tokens, and all geometry (position buckets, resampler positions, key
padding) comes from ``tgt_sizes``.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

# --------------------------------------------------------------------------------------------------
# SigLIP (NaViT) vision tower
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _bucket_coords(nb: int, num_patches_per_side: int) -> torch.Tensor:
    """Bucket index along one axis for a slice that is ``nb`` patches long.

    Reproduces the reference exactly: in ``get_vllm_embedding`` tgt_sizes is an int32 tensor, so
    ``1 / nb`` there is a float32 0-d tensor (not a Python double), and ``torch.arange(0, 1 - 1e-6, step)``
    runs on CPU in float32. transformers' Idefics2 embeddings (``arange(nb) / nb * (1 - 1e-6)``) and
    ``get_vision_nearest_position_ids`` (``arange(nb) / nb``) give different buckets for many nb (e.g. 24,
    32, 70 resp. 25, 49, 50), and even a Python-float step differs for nb = 25, 49, 50, 55, ... — so none of
    those may be substituted.
    """
    step = 1 / torch.tensor(nb, dtype=torch.int32)  # float32, as in the reference
    fractional = torch.arange(0, 1 - 1e-6, step)
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    return torch.bucketize(fractional, boundaries, right=True)


def navit_position_ids(nb_h: int, nb_w: int, num_patches_per_side: int = 70) -> torch.Tensor:
    """Position-table ids [nb_h * nb_w] (raster order) of a slice with an (nb_h, nb_w) patch grid."""
    rows = _bucket_coords(int(nb_h), num_patches_per_side)
    cols = _bucket_coords(int(nb_w), num_patches_per_side)
    return (rows[:, None] * num_patches_per_side + cols).flatten()


class NavitSiglipEmbeddings(nn.Module):
    """Patch conv + learned position table indexed by the NaViT buckets (no class token, no interpolation)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, self.patch_size, stride=self.patch_size, padding="valid"
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, self.embed_dim)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [B, L, D]
        num_tokens = (height // self.patch_size) * (width // self.patch_size)
        # Padded positions keep id 0, as the reference (their outputs are never used downstream).
        position_ids = torch.zeros((batch, num_tokens), dtype=torch.long)
        for index, (nb_h, nb_w) in enumerate(tgt_sizes.tolist()):
            position_ids[index, : nb_h * nb_w] = navit_position_ids(nb_h, nb_w, self.num_patches_per_side)
        position_ids = position_ids.to(self.position_embedding.weight.device)
        return embeddings + self.position_embedding(position_ids)


class NavitSiglipEncoder(nn.Module):
    """A stack of pre-LN SigLIP layers (transformers' ``SiglipEncoderLayer``, whose names match ``vpm.*``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


def _key_padding_bias(patch_attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive [B, 1, 1, L] mask hiding padded keys (dtype-min), or None when nothing is padded.

    As the reference: only keys are masked; padded queries still run (their outputs are discarded later).
    """
    valid = patch_attention_mask.reshape(patch_attention_mask.shape[0], -1).bool()
    if bool(valid.all()):
        return None
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    bias = bias.masked_fill(~valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class NavitSiglipVisionTransformer(nn.Module):
    """SigLIP-400M NaViT vision tower with exactly the checkpoint's ``vpm.*`` parameter names.

    ``vision_config`` is the SigLIP sub-config, or the whole MiniCPMOConfig (then its
    ``drop_vision_last_layer`` is honoured). ``attn_implementation``: "sdpa" (default) or "eager"; the
    reference forces eager for vision, and the two agree within float rounding.
    """

    def __init__(
        self, vision_config, attn_implementation: str = "sdpa", drop_last_layer: bool | None = None
    ) -> None:
        super().__init__()
        if hasattr(vision_config, "vision_config"):  # handed the top-level MiniCPMOConfig
            if drop_last_layer is None:
                drop_last_layer = bool(getattr(vision_config, "drop_vision_last_layer", False))
            vision_config = vision_config.vision_config
        if drop_last_layer is None:
            drop_last_layer = bool(getattr(vision_config, "drop_vision_last_layer", False))
        config = copy.deepcopy(vision_config)
        # Only eager and sdpa take the additive key-padding mask used here; flash-attention would need the
        # unpadded (varlen) layout, so any other request runs sdpa (same math).
        config._attn_implementation = attn_implementation if attn_implementation == "eager" else "sdpa"
        self.config = config
        self.embeddings = NavitSiglipEmbeddings(config)
        self.encoder = NavitSiglipEncoder(config)
        if drop_last_layer:
            # The reference's `drop_vision_last_layer`: keep layers[:-1] (false in the o-2.6 config.json).
            self.encoder.layers = self.encoder.layers[:-1]
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Attributes the reference sets on `vpm` and other code reads.
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        tgt_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pixel_values [B, 3, 14, L*14], patch_attention_mask [B, 1, L] bool, tgt_sizes [B, 2] -> [B, L, D]."""
        batch = pixel_values.shape[0]
        grid_h, grid_w = pixel_values.shape[2] // self.patch_size, pixel_values.shape[3] // self.patch_size
        num_tokens = grid_h * grid_w
        if tgt_sizes is None:  # un-padded input: its own patch grid (1 x L for a strip), as the reference
            tgt_sizes = torch.tensor([[grid_h, grid_w]] * batch)
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones((batch, 1, num_tokens), dtype=torch.bool)
        hidden = self.embeddings(pixel_values, tgt_sizes)
        bias = _key_padding_bias(patch_attention_mask.to(hidden.device), hidden.dtype)
        hidden = self.encoder(hidden, bias)
        return self.post_layernorm(hidden)


# --------------------------------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(embed_dim: int, height: int, width: int) -> np.ndarray:
    """[height, width, embed_dim] float32 table, computed with numpy in float32 as the reference.

    The first half of the channels encodes the column (w) index and the second half the row (h) index
    (the reference meshgrids w first); each half is [sin, cos] with omega_k = 1 / 10000^(k / (D/4)).
    """
    quarter = embed_dim // 4
    omega = np.arange(quarter, dtype=np.float32)
    omega /= embed_dim / 4.0
    omega = 1.0 / 10000**omega
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = np.einsum("hw,d->hwd", positions, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    return np.concatenate([encode(cols), encode(rows)], axis=-1)


class Resampler(nn.Module):
    """One cross-attention layer from ``num_queries`` learned queries onto a slice's patch features.

    The 2-D sin-cos positions are added to the keys only (not values, not queries); ``proj`` is a bare
    matrix applied as ``x @ proj`` (right-multiplication, not an nn.Linear).
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)  # sequence-first, as the reference
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        # Not a registered buffer: it is not in the checkpoint, and keeping it out of the module state
        # keeps it float32 and safe from meta-device construction and dtype casts of the model.
        self._pos_size = (70, 70)
        self._pos_cache: torch.Tensor | None = None

    def _pos_table(self, max_h: int, max_w: int, device: torch.device) -> torch.Tensor:
        if max_h > self._pos_size[0] or max_w > self._pos_size[1]:
            # Grows (and stays grown) when a slice is longer than 70 patches on a side, as the reference.
            self._pos_size = (max(max_h, self._pos_size[0]), max(max_w, self._pos_size[1]))
            self._pos_cache = None
        if self._pos_cache is None:
            table = sincos_pos_embed_2d(self.embed_dim, *self._pos_size)
            self._pos_cache = torch.from_numpy(table).float()
        if self._pos_cache.device != device:
            self._pos_cache = self._pos_cache.to(device)
        return self._pos_cache

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x [B, L, kv_dim] (valid patches first), tgt_sizes [B, 2] (h, w) -> [B, num_queries, embed_dim]."""
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        batch, device, dtype = x.shape[0], x.device, x.dtype
        table = self._pos_table(max(h for h, _ in sizes), max(w for _, w in sizes), device)
        max_len = max(h * w for h, w in sizes)
        pos = torch.zeros((max_len, batch, self.embed_dim), dtype=dtype, device=device)
        key_padding_mask = torch.zeros((batch, max_len), dtype=torch.bool, device=device)
        for index, (h, w) in enumerate(sizes):
            pos[: h * w, index] = table[:h, :w].reshape(h * w, -1).to(dtype)
            key_padding_mask[index, h * w :] = True

        kv = self.ln_kv(self.kv_proj(x[:, :max_len])).permute(1, 0, 2)  # [L, B, D]
        queries = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)  # [Q, B, D]
        out = self.attn(queries, kv + pos, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


# --------------------------------------------------------------------------------------------------
# Batch encoding (vision part of get_vllm_embedding)
# --------------------------------------------------------------------------------------------------


def _gather_slices(pixel_values: list, tgt_sizes: list) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """Flatten all samples' slices into one list; returns (strips [L_i*14, 42], sizes [N, 2] int32, counts)."""
    strips, sizes, counts = [], [], []
    for sample_pixels, sample_sizes in zip(pixel_values, tgt_sizes):
        counts.append(len(sample_pixels))
        if len(sample_pixels) == 0:
            continue
        # [3, 14, L*14] -> [42, L*14] -> [L*14, 42] so that pad_sequence pads along the patch axis.
        strips.extend(slice_pixels.flatten(end_dim=1).permute(1, 0) for slice_pixels in sample_pixels)
        sizes.append(torch.as_tensor(sample_sizes).reshape(-1, 2))
    size_tensor = torch.cat(sizes).to(torch.int32) if sizes else torch.zeros((0, 2), dtype=torch.int32)
    if size_tensor.shape[0] != len(strips):
        raise ValueError(f"{len(strips)} pixel_values entries but {size_tensor.shape[0]} tgt_sizes rows")
    return strips, size_tensor, counts


def encode_images(
    vpm: NavitSiglipVisionTransformer,
    resampler: Resampler,
    pixel_values: list,
    tgt_sizes: list,
    vision_batch_size: int = 16,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Encode every slice of every sample; returns per sample a [n_slices, Q, D] tensor ([0, Q, D] if none).

    As the reference: all slices are right-padded to the longest one, the vision tower runs in chunks of
    ``vision_batch_size`` slices (with the global padding), and the resampler runs over all slices at once.
    """
    param = next(vpm.parameters())
    dtype = dtype or param.dtype
    device = param.device
    strips, sizes, counts = _gather_slices(pixel_values, tgt_sizes)
    empty = torch.zeros((0, resampler.num_queries, resampler.embed_dim), dtype=dtype, device=device)
    if not strips:
        return [empty for _ in counts]

    padded = torch.nn.utils.rnn.pad_sequence(strips, batch_first=True, padding_value=0.0)
    num_slices, rows, _ = padded.shape
    padded = padded.permute(0, 2, 1).reshape(num_slices, 3, -1, rows).to(device=device, dtype=dtype)
    lengths = (sizes[:, 0] * sizes[:, 1]).long()
    patch_mask = torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None]
    patch_mask = patch_mask[:, None, :].to(device)

    chunks = [slice(start, start + vision_batch_size) for start in range(0, num_slices, vision_batch_size)]
    hidden = torch.cat([vpm(padded[chunk], patch_mask[chunk], sizes[chunk]) for chunk in chunks])
    embeds = resampler(hidden, sizes)

    result, start = [], 0
    for count in counts:
        result.append(embeds[start : start + count] if count else empty)
        start += count
    return result
