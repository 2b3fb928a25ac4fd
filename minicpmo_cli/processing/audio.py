"""Audio input processing: Whisper log-mel features and the LLM placeholder strings (spec audio-tts §1.2-1.4).

The features equal what the reference processor gets from transformers' ``WhisperFeatureExtractor``
(80 mels, n_fft 400, hop 160, every piece padded to 30 s) called by ``MiniCPMOProcessor.audio_feature_extract``.
We compute them ourselves, with a float32 ``torch.stft`` on any device, and only over the piece's own length
plus the zeros its last frames see (:func:`log_mel_window`), not over a 30 s window: the valid frames and the
normalisation are the same numbers (up to the BLAS rounding of the mel product; on the CPU they equal the
golden vectors exactly), at a cost that grows
with the audio instead of 25 ms for every piece.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from minicpmo_cli.units import INPUT_SAMPLE_RATE, MEL_HOP_SAMPLES, WHISPER_WINDOW_SECONDS

N_FFT = 400
N_MELS = 80
WINDOW_SAMPLES = WHISPER_WINDOW_SECONDS * INPUT_SAMPLE_RATE  # 480 000: one Whisper pass
WINDOW_FRAMES = WINDOW_SAMPLES // MEL_HOP_SAMPLES  # 3000 mel frames
POOL_STEP = 2  # hard-coded in the reference's placeholder maths (config.audio_pool_step is 2 as well)

AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_UNK = "<unk>"


# --------------------------------------------------------------------------------------------- token counts
def mel_frame_count(n_samples: int, hop_length: int = MEL_HOP_SAMPLES) -> int:
    """Valid mel frames of a piece: the extractor's frame-level attention mask sums to ceil(N / hop)."""
    return math.ceil(n_samples / hop_length)


def encoder_frame_count(mel_frames: int) -> int:
    """Frames after Whisper's conv2 (kernel 3, stride 2, padding 1)."""
    return (mel_frames - 1) // 2 + 1


def pooled_token_count(encoder_frames: int, pool_step: int = POOL_STEP) -> int:
    """LLM embeddings after AvgPool1d(pool_step) (floor division, the last odd frame is dropped)."""
    return (encoder_frames - pool_step) // pool_step + 1


def audio_token_count(n_samples: int) -> int:
    """Number of ``<unk>`` LLM positions an audio of ``n_samples`` samples (16 kHz) occupies."""
    return pooled_token_count(encoder_frame_count(mel_frame_count(n_samples)))


def get_audio_placeholder(n_samples: int, chunk_input: bool = True, chunk_length: float = 1.0) -> str:
    """The placeholder text the processor substitutes for one ``(<audio>./</audio>)`` tag.

    With ``chunk_input`` every started ``chunk_length`` seconds gets its own ``<|audio_start|>`` ...
    ``<|audio_end|>`` pair holding min(per_chunk, remaining) ``<unk>``; per_chunk is derived from the chunk's
    mel frames exactly as the reference does (100 mel -> 50 encoder -> 25 tokens for 1 s).
    """
    total = audio_token_count(n_samples)
    if not chunk_input:
        return AUDIO_START + AUDIO_UNK * total + AUDIO_END
    per_chunk = pooled_token_count(encoder_frame_count(int(chunk_length * 100)))
    n_chunks = (total + per_chunk - 1) // per_chunk
    parts = []
    used = 0
    for _ in range(n_chunks):
        n = min(per_chunk, total - used)
        parts.append(AUDIO_START + AUDIO_UNK * n + AUDIO_END)
        used += n
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ log-mel
@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    """Slaney-scale, Slaney-normalised 80-filter bank over 0-8 kHz, [201, 80] float64 (Whisper's bank)."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=INPUT_SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )


@lru_cache(maxsize=8)
def _stft_constants(device: str):
    """(periodic Hann window [400], mel bank transposed [80, 201]) as float32 tensors on ``device``."""
    import torch

    window = torch.hann_window(N_FFT, dtype=torch.float32, device=device)
    bank = torch.from_numpy(_mel_filters()).to(torch.float32).T.contiguous().to(device)
    return window, bank


def stft_length(n_samples: int) -> int:
    """Samples the STFT of an ``n_samples`` piece needs so that its frames equal those of the 30 s window.

    In the reference the piece is zero-padded to 30 s, then reflect-padded by n_fft/2 at both ends, so every
    frame that touches the audio sees zeros after it. Padding with zeros to ``n + n_fft/2 + 1`` keeps that
    true (the end reflection then mirrors only zeros) and computes every frame that holds a sample: the
    frames after them hold only zeros, give log10(1e-10) = -10, the smallest value there is, and so cannot
    change the max of the normalisation either. A piece within n_fft/2 of 30 s simply takes the 30 s window.
    """
    return min(WINDOW_SAMPLES, n_samples + N_FFT // 2 + 1)


def log_mel_window(audio: np.ndarray, device=None):
    """Log-mel features of one <= 30 s piece, as ``WhisperFeatureExtractor(padding="max_length")``.

    Returns (features [80, valid_frames] float32 tensor on ``device`` (default CPU), valid_frames). The
    normalisation (clamp at max - 8) runs over the same frames as over the reference's padded 30 s window
    (see :func:`stft_length`); only the valid frames are returned.
    """
    import torch

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be a 1-D mono array, got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("empty audio: no samples to extract features from")
    if audio.size > WINDOW_SAMPLES:
        raise ValueError(f"audio piece of {audio.size} samples exceeds one 30 s window")
    device = torch.device(device if device is not None else "cpu")
    window, bank = _stft_constants(str(device))
    wave = torch.zeros(stft_length(audio.size), dtype=torch.float32, device=device)
    wave[: audio.size] = torch.from_numpy(audio).to(device)
    spectrum = torch.stft(wave, N_FFT, MEL_HOP_SAMPLES, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
    power = (spectrum.abs() ** 2)[:, :WINDOW_FRAMES]  # abs in float32 then square, as the reference
    log_spec = torch.clamp(bank @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    valid = mel_frame_count(audio.size)
    return log_spec[:, :valid].contiguous(), valid


def log_mel_batch(clips: Sequence[np.ndarray], device=None):
    """:func:`log_mel_window` of many <= 30 s pieces in one STFT: (features ``[B, 80, longest]`` float32 on
    ``device``, right-padded with 0.0 as :func:`extract_audio_features` pads, valid frames per piece).

    Each row is zero-padded to the batch's longest :func:`stft_length`: a row's frames then see exactly the
    zeros they see alone (a row within n_fft/2 of 30 s gets the 30 s window, as alone), and its frames past
    its own STFT length hold only zeros, -10 after the log, which cannot move its max; the max - 8 clamp is
    taken per row. So every row equals its single-piece features (on the CPU bit for bit: tests).
    """
    import torch

    if not clips:
        raise ValueError("no audio pieces")
    for clip in clips:
        if clip.ndim != 1 or clip.size == 0 or clip.size > WINDOW_SAMPLES:
            raise ValueError(f"audio pieces must be 1-D with 1 to {WINDOW_SAMPLES} samples, got {clip.shape}")
    device = torch.device(device if device is not None else "cpu")
    window, bank = _stft_constants(str(device))
    host = np.zeros((len(clips), max(stft_length(clip.size) for clip in clips)), np.float32)
    for row, clip in zip(host, clips):
        row[:clip.size] = clip
    wave = torch.from_numpy(host).to(device, non_blocking=True)
    spectrum = torch.stft(wave, N_FFT, MEL_HOP_SAMPLES, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
    power = (spectrum.abs() ** 2)[:, :, :WINDOW_FRAMES]
    log_spec = torch.clamp(bank @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    valid = [mel_frame_count(clip.size) for clip in clips]
    frames = torch.arange(log_spec.shape[-1], device=device)
    keep = frames[None, :] < torch.tensor(valid, device=device)[:, None]
    features = torch.where(keep[:, None, :], log_spec, 0.0)[:, :, :max(valid)]
    return features.contiguous(), valid


# ---------------------------------------------------------------------------------------- batching helpers
def _normalise_audios(audios) -> list[list[np.ndarray]]:
    """Accept one array, a list of arrays (one sample) or a list of lists (a batch), as the reference."""
    if isinstance(audios, np.ndarray):
        return [[audios]]
    if len(audios) > 0 and isinstance(audios[0], np.ndarray):
        return [list(audios)]
    return [list(a) for a in audios]


def merge_audio_parts(audios: Sequence[np.ndarray], parts: Sequence[int] | None) -> list[np.ndarray]:
    """Concatenate consecutive audios that share a part index (chat() passes each audio's message index).

    Only *consecutive* equal indices merge, as the reference; ``parts=None`` keeps every audio separate.
    """
    if parts is None:
        return list(audios)
    if len(parts) != len(audios):
        raise ValueError(f"audio_parts has {len(parts)} entries for {len(audios)} audios")
    merged: list[np.ndarray] = []
    current: list[np.ndarray] = []
    for i, audio in enumerate(audios):
        if i > 0 and parts[i] != parts[i - 1]:
            merged.append(np.hstack(current))
            current = []
        current.append(audio)
    if current:
        merged.append(np.hstack(current))
    return merged


def split_into_windows(audio: np.ndarray, sampling_rate: int = INPUT_SAMPLE_RATE) -> list[np.ndarray]:
    """Cut an audio longer than 30 s into consecutive 30 s pieces (the last one shorter)."""
    window = WHISPER_WINDOW_SECONDS * sampling_rate
    if len(audio) <= window:
        return [audio]
    return [audio[i * window : (i + 1) * window] for i in range(math.ceil(len(audio) / window))]


def extract_audio_features(
    audios,
    audio_parts: list[list[int]] | None = None,
    chunk_input: bool = True,
    sampling_rate: int = INPUT_SAMPLE_RATE,
    chunk_length: float = 1.0,
    device=None,
):
    """Batch log-mel extraction as the reference's ``audio_feature_extract``.

    ``audios`` is a list (per sample) of lists of 1-D float arrays at 16 kHz; ``audio_parts`` the matching
    message indices. Per sample: audios of one part are concatenated, pieces over 30 s are split into 30 s
    windows, each window becomes one row. Returns ``(audio_features, audio_feature_lens)``:
    ``audio_features`` a float32 tensor [windows, 80, max_frames] right-padded with 0.0 (``[]`` when there
    is no audio at all), ``audio_feature_lens`` one int64 tensor of valid frames per sample (``[]`` for a
    sample without audio). ``chunk_input``/``chunk_length`` only shape the placeholders
    (:func:`get_audio_placeholder`); they are accepted here to keep the reference's signature. ``device``:
    where the features are computed and returned (default CPU); each piece is computed on its own, so a
    piece's features do not depend on the others in the batch.
    """
    import torch

    if sampling_rate != INPUT_SAMPLE_RATE:
        raise ValueError(f"audio must be sampled at {INPUT_SAMPLE_RATE} Hz, got {sampling_rate}")
    batch = _normalise_audios(audios)
    if audio_parts is not None and len(audio_parts) != len(batch):
        raise ValueError(f"audio_parts has {len(audio_parts)} samples for {len(batch)}")
    rows: list = []
    lens_per_sample: list = []
    for index, sample_audios in enumerate(batch):
        if not sample_audios:
            lens_per_sample.append([])
            continue
        parts = None if audio_parts is None else audio_parts[index]
        lens = []
        for piece in merge_audio_parts(sample_audios, parts):
            for window in split_into_windows(piece, sampling_rate):
                features, valid = log_mel_window(window, device)
                rows.append(features)
                lens.append(valid)
        lens_per_sample.append(torch.tensor(lens, dtype=torch.int64))
    if not rows:
        return [], lens_per_sample
    longest = max(r.shape[1] for r in rows)
    audio_features = torch.zeros(len(rows), N_MELS, longest, dtype=torch.float32, device=rows[0].device)
    for i, r in enumerate(rows):
        audio_features[i, :, : r.shape[1]] = r
    return audio_features, lens_per_sample
