"""Vocos vocoder (mel -> 24 kHz waveform), decode path only, plain torch (no torchaudio, no vocos package).

Parameter names follow ``assets/Vocos.pt``: ``backbone.*`` (ConvNeXt backbone), ``head.out`` and the
``head.istft.window`` buffer. The file also carries the mel feature extractor's buffers
(``feature_extractor.*``); decoding never needs them, so they are accepted and dropped at load time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minicpmo_cli.units import OUTPUT_SAMPLE_RATE


class VocosConvNeXtBlock(nn.Module):
    """dwconv k7 -> LayerNorm -> Linear -> GELU -> Linear -> ``gamma`` layer scale -> residual."""

    def __init__(self, dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList([VocosConvNeXtBlock(dim, intermediate_dim) for _ in range(num_layers)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel ``[B, n_mels, T]`` -> features ``[B, T, dim]``."""
        x = self.embed(mel)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class ISTFTSame(nn.Module):
    """Inverse STFT with vocos' "same" padding.

    vocos trims ``(win - hop) / 2`` samples on each side of the full overlap-add and divides by the
    squared-window envelope, giving exactly ``T * hop`` samples. ``torch.istft(center=True)`` trims
    ``n_fft / 2`` instead (a different alignment and length), and ``center=False`` fails torch's NOLA check at
    the edges, so the overlap-add is done here by hand.
    """

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def _overlap_add(self, frames: torch.Tensor, output_size: int) -> torch.Tensor:
        """frames ``[B, win, T]`` -> ``[B, output_size]`` summing frame t at offset ``t * hop``."""
        return nn.functional.fold(
            frames,
            output_size=(1, output_size),
            kernel_size=(1, self.n_fft),
            stride=(1, self.hop_length),
        )[:, 0, 0, :]

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """spec complex ``[B, n_fft/2+1, T]`` -> waveform ``[B, T * hop]``."""
        _, _, num_frames = spec.shape
        pad = (self.n_fft - self.hop_length) // 2
        frames = torch.fft.irfft(spec, self.n_fft, dim=1, norm="backward") * self.window[None, :, None]
        output_size = (num_frames - 1) * self.hop_length + self.n_fft
        audio = self._overlap_add(frames, output_size)[:, pad:-pad]
        window_sq = self.window.square().expand(1, num_frames, -1).transpose(1, 2)
        envelope = self._overlap_add(window_sq, output_size)[0, pad:-pad]
        if not bool((envelope > 1e-11).all()):
            raise ValueError("ISTFT window envelope vanishes (too few frames)")
        return audio / envelope


class ISTFTHead(nn.Module):
    """Linear -> (log-magnitude, phase) -> complex spectrogram -> ISTFT "same"."""

    def __init__(self, dim: int, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFTSame(n_fft, hop_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.out(x).transpose(1, 2)
        log_mag, phase = x.chunk(2, dim=1)
        # Clip as vocos does: guards against huge magnitudes from exp.
        mag = torch.clip(torch.exp(log_mag), max=1e2)
        spec = mag * (torch.cos(phase) + 1j * torch.sin(phase))
        return self.istft(spec)


class Vocos(nn.Module):
    """``decode(mel [B, 100, T]) -> wav [B, T * 256]`` at 24 kHz. Run it in float32 (as the reference)."""

    def __init__(self, tts_config=None) -> None:
        super().__init__()
        n_mels = int(getattr(tts_config, "num_mel_bins", 100))
        self.sample_rate = int(getattr(tts_config, "sample_rate", OUTPUT_SAMPLE_RATE))
        self.backbone = VocosBackbone(
            input_channels=n_mels,
            dim=int(getattr(tts_config, "vocos_dim", 512)),
            intermediate_dim=int(getattr(tts_config, "vocos_intermediate_dim", 1536)),
            num_layers=int(getattr(tts_config, "vocos_num_layers", 8)),
        )
        self.head = ISTFTHead(
            dim=int(getattr(tts_config, "vocos_dim", 512)),
            n_fft=int(getattr(tts_config, "vocos_n_fft", 1024)),
            hop_length=int(getattr(tts_config, "vocos_hop_length", 256)),
        )

    @torch.inference_mode()
    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        dtype = self.head.out.weight.dtype
        return self.head(self.backbone(mel.to(dtype)))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.decode(mel)


def load_vocos(path: str | Path, tts_config=None, device="cpu", dtype=torch.float32) -> Vocos:
    """Build :class:`Vocos` and load ``assets/Vocos.pt`` (a plain state dict) strictly, minus the mel
    feature-extractor buffers."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("feature_extractor.")}
    vocos = Vocos(tts_config)
    vocos.load_state_dict(state, strict=True)
    return vocos.to(device=device, dtype=dtype).eval()
