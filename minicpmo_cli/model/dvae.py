"""The ChatTTS discrete VAE used by MiniCPM-o 2.6's TTS (``tts.dvae.*``): audio codes -> 100-bin log-mel.

Only the decode path runs at inference. The encoder-side modules (``downsample_conv``, ``encoder``,
``project_in``) exist so the official checkpoint loads with every parameter name accounted for.

Code layout (spec audio-tts §4): a code frame holds ``num_vq = 4`` indices in ``[0, 625)``; codebooks 0/1 are
residual levels 0/1 of FSQ group 0, codebooks 2/3 of group 1. Each index is 4 base-5 digits; each digit ``d``
maps to ``(d - 2) / 2``; residual level ``r`` is scaled by ``4**-r`` (``(levels - 1) ** -r``); the levels are
summed and projected 4 -> 512 per group. The two groups are then interleaved in time, so one code frame gives
two mel frames.
"""

from __future__ import annotations

import torch
from torch import nn

FSQ_LEVELS = (5, 5, 5, 5)
FSQ_GROUPS = 2
FSQ_RESIDUALS = 2


class ConvNeXtBlock(nn.Module):
    """Depthwise dilated conv -> LayerNorm -> MLP -> layer scale ``coef`` -> residual (ChatTTS flavour)."""

    def __init__(self, dim: int, intermediate_dim: int, kernel: int = 7, dilation: int = 2) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(
            dim, dim, kernel_size=kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=dim
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.coef = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)  # (B, C, T) -> (B, T, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = y * self.coef
        return x + y.transpose(1, 2)


class DVAEDecoder(nn.Module):
    """conv_in (conv k3, GELU, conv k3) -> ConvNeXt blocks -> 1x1 ``conv_out`` (names as ChatTTS)."""

    def __init__(self, idim: int, odim: int, n_layer: int, bn_dim: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.conv_in = nn.Sequential(
            nn.Conv1d(idim, bn_dim, 3, 1, 1),
            nn.GELU(),
            nn.Conv1d(bn_dim, hidden, 3, 1, 1),
        )
        self.decoder_block = nn.ModuleList([ConvNeXtBlock(hidden, inner) for _ in range(n_layer)])
        self.conv_out = nn.Conv1d(hidden, odim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)
        for block in self.decoder_block:
            y = block(y)
        return self.conv_out(y)


class _ResidualFSQ(nn.Module):
    """One FSQ group: holds ``project_in`` (encode only) and ``project_out`` like vector-quantize-pytorch 1.18.5."""

    def __init__(self, dim: int, codebook_dim: int) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)


class _GroupedResidualFSQ(nn.Module):
    def __init__(self, dim: int, groups: int, codebook_dim: int) -> None:
        super().__init__()
        self.rvqs = nn.ModuleList([_ResidualFSQ(dim // groups, codebook_dim) for _ in range(groups)])


class GFSQ(nn.Module):
    """Grouped residual finite scalar quantiser; only ``indices -> features`` is implemented."""

    def __init__(self, dim: int = 1024, levels=FSQ_LEVELS, groups: int = FSQ_GROUPS, residuals: int = FSQ_RESIDUALS):
        super().__init__()
        self.quantizer = _GroupedResidualFSQ(dim, groups, len(levels))
        self.groups = groups
        self.residuals = residuals
        levels_t = torch.tensor(levels, dtype=torch.long)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), dim=0)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """FSQ index -> code vector in {-1, -0.5, 0, 0.5, 1}^4 (``(digit - half_width) / half_width``)."""
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels
        half_width = self._levels // 2
        return (digits - half_width).float() / half_width

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, G*R, T]`` -> features ``[B, dim, T]`` (the reference's ``GFSQ._embed``)."""
        batch, _, frames = codes.shape
        per_group = codes.transpose(1, 2).reshape(batch, frames, self.groups, self.residuals)
        outputs = []
        for group, rvq in enumerate(self.quantizer.rvqs):
            summed = None
            for level in range(self.residuals):
                code = self.indices_to_codes(per_group[:, :, group, level])
                scale = (self._levels - 1).float() ** -level
                code = code * scale
                summed = code if summed is None else summed + code
            weight = rvq.project_out.weight
            outputs.append(rvq.project_out(summed.to(weight.dtype)))
        return torch.cat(outputs, dim=-1).transpose(1, 2)


class DVAE(nn.Module):
    """``tts.dvae``: ``decode(codes [B, num_vq, T]) -> log-mel [B, 100, 2T]``."""

    def __init__(self, tts_config=None) -> None:
        super().__init__()
        num_mels = int(getattr(tts_config, "num_mel_bins", 100))
        idim = int(getattr(tts_config, "dvae_idim", 512))
        hidden = int(getattr(tts_config, "dvae_hidden", 256))
        inner = int(getattr(tts_config, "dvae_inner", 1024))
        bn_dim = int(getattr(tts_config, "dvae_bn_dim", 128))
        n_layer = int(getattr(tts_config, "dvae_num_layers", 12))
        self.num_mels = num_mels
        self.coef = nn.Parameter(torch.ones(1, num_mels, 1))
        self.downsample_conv = nn.Sequential(
            nn.Conv1d(num_mels, idim, 3, 1, 1),
            nn.GELU(),
            nn.Conv1d(idim, idim, 4, 2, 1),
            nn.GELU(),
        )
        self.encoder = DVAEDecoder(idim, 2 * idim, n_layer, bn_dim, hidden, inner)
        self.decoder = DVAEDecoder(idim, idim, n_layer, bn_dim, hidden, inner)
        self.out_conv = nn.Conv1d(idim, num_mels, 3, 1, 1, bias=False)
        self.vq_layer = GFSQ(dim=2 * idim)

    @torch.inference_mode()
    def vq_features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, 4, T]`` -> decoder input ``[B, 512, 2T]`` (group 0 at even, group 1 at odd frames)."""
        feats = self.vq_layer.embed(codes)
        batch, channels, frames = feats.shape
        return feats.view(batch, 2, channels // 2, frames).permute(0, 2, 3, 1).flatten(2)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        mel = self.out_conv(self.decoder(self.vq_features(codes)))
        return mel * self.coef

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(codes)


def decode_codes_to_mel(dvae: DVAE, codes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """As the reference's ``decode_to_mel_specs``: a list (or batch tensor) of ``[T_i, num_vq]`` code
    sequences is zero-padded to ``[B, num_vq, T_max]`` and decoded to ``[B, 100, 2*T_max]``."""
    sequences = list(codes)
    if not sequences:
        raise ValueError("no audio codes to decode")
    max_len = max(seq.shape[0] for seq in sequences)
    batch = torch.zeros(
        (len(sequences), sequences[0].shape[1], max_len), dtype=torch.long, device=sequences[0].device
    )
    for i, seq in enumerate(sequences):
        batch[i, :, : seq.shape[0]] = seq.transpose(0, 1)
    return dvae.decode(batch)
