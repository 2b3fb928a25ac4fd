"""Audio processing: placeholder strings, log-mel features, merging of parts and 30 s windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmo_cli.processing.audio import (
    AUDIO_END,
    AUDIO_START,
    audio_token_count,
    extract_audio_features,
    get_audio_placeholder,
    log_mel_window,
    merge_audio_parts,
)


def _noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _unk_runs(placeholder: str) -> list[int]:
    runs = []
    for part in placeholder.split(AUDIO_START)[1:]:
        body, rest = part.split(AUDIO_END)
        assert rest == ""
        runs.append(body.count("<unk>"))
        assert body == "<unk>" * runs[-1]
    return runs


@pytest.mark.parametrize(
    ("n_samples", "runs"),
    [
        (16000, [25]),
        (48000, [25, 25, 25]),
        (40000, [25, 25, 12]),  # case d: 2.5 s
        (16640, [25, 1]),  # 104 mel -> 52 encoder -> 26 tokens
        (16160, [25]),  # 101 mel -> 51 encoder -> 25 tokens (the odd encoder frame is pooled away)
        (320, []),  # 2 mel -> 1 encoder frame -> 0 tokens: no chunk at all
    ],
)
def test_placeholder_runs(n_samples, runs):
    assert _unk_runs(get_audio_placeholder(n_samples)) == runs
    assert audio_token_count(n_samples) == sum(runs)


def test_placeholder_without_chunking_is_one_run():
    text = get_audio_placeholder(40000, chunk_input=False)
    assert text == AUDIO_START + "<unk>" * 62 + AUDIO_END


def test_placeholder_with_two_second_chunks():
    # 200 mel -> 100 encoder -> 50 tokens per chunk.
    assert _unk_runs(get_audio_placeholder(5 * 16000, chunk_length=2.0)) == [50, 50, 25]


def test_features_match_whisper_feature_extractor_closely():
    from transformers import WhisperFeatureExtractor

    audio = _noise(1.7, seed=1)
    ours, valid = log_mel_window(audio)
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400)
    ref = extractor([audio], sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    assert valid == int(ref["attention_mask"].sum()) == 170
    assert ours.shape == (80, 170)
    assert torch.allclose(ours, ref["input_features"][0, :, :170], atol=5e-5, rtol=0)


def test_clip_over_30_seconds_is_split_into_windows():
    audio = _noise(65.0, seed=2)
    features, lens = extract_audio_features([[audio]], [[0]])
    assert features.shape == (3, 80, 3000)
    assert lens[0].tolist() == [3000, 3000, 500]
    first, _ = log_mel_window(audio[:480000])
    last, _ = log_mel_window(audio[960000:])
    assert torch.equal(features[0], first)
    assert torch.equal(features[2, :, :500], last)
    assert torch.count_nonzero(features[2, :, 500:]) == 0  # zero padding to the longest window


def test_audios_of_one_message_are_concatenated_before_extraction():
    a, b = _noise(1.0, seed=3), _noise(0.55, seed=4)
    merged, lens = extract_audio_features([[a, b]], [[1, 1]])
    assert merged.shape == (1, 80, 155) and lens[0].tolist() == [155]
    whole, _ = log_mel_window(np.hstack([a, b]))
    assert torch.equal(merged[0], whole)
    separate, lens_sep = extract_audio_features([[a, b]], [[0, 1]])
    assert separate.shape == (2, 80, 100) and lens_sep[0].tolist() == [100, 55]
    assert torch.equal(extract_audio_features([[a, b]])[0], separate)  # no parts: every audio on its own


def test_only_consecutive_parts_merge():
    a, b, c = (np.full(10, v, dtype=np.float32) for v in (1, 2, 3))
    merged = merge_audio_parts([a, b, c], [0, 1, 0])
    assert [m.tolist()[0] for m in merged] == [1, 2, 3]
    assert [len(m) for m in merge_audio_parts([a, b, c], [0, 0, 1])] == [20, 10]


def test_batch_with_a_sample_without_audio():
    features, lens = extract_audio_features([[_noise(0.5, 5)], [], [_noise(0.3, 6)]], [[0], [], [2]])
    assert features.shape == (2, 80, 50)
    assert lens[0].tolist() == [50] and lens[1] == [] and lens[2].tolist() == [30]
    assert lens[0].dtype == torch.int64


def test_no_audio_and_bad_inputs():
    assert extract_audio_features([[]]) == ([], [[]])
    with pytest.raises(ValueError):
        extract_audio_features([[_noise(0.1, 7)]], sampling_rate=8000)
    with pytest.raises(ValueError):
        log_mel_window(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError):
        log_mel_window(np.zeros((2, 1600), dtype=np.float32))  # stereo must be downmixed by the loader


def _log_mel_over_30_s(audio: np.ndarray) -> torch.Tensor:
    """The reference's way: zero-pad to 30 s, STFT the whole window, normalise over its 3000 frames."""
    from minicpmo_cli.processing.audio import _stft_constants

    window, bank = _stft_constants("cpu")
    padded = torch.zeros(480000)
    padded[: audio.size] = torch.from_numpy(audio)
    spectrum = torch.stft(padded, 400, 160, window=window, center=True, pad_mode="reflect", return_complex=True)
    log_spec = torch.clamp(bank @ (spectrum.abs() ** 2)[:, :3000], min=1e-10).log10()
    log_spec = (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
    return log_spec[:, : -(-audio.size // 160)]


def _loud_tail(n: int) -> np.ndarray:
    """Quiet noise whose loudest samples are its last 30: the frames after the valid ones set the max."""
    audio = _noise(n / 16000, seed=n) * 1e-3
    audio[-30:] = 0.9
    return audio


@pytest.mark.parametrize("n", [320, 1000, 16000, 16001, 16199, 40000, 479_790, 479_800, 480_000])
@pytest.mark.parametrize("make", [lambda n: _noise(n / 16000, seed=n), _loud_tail])
def test_features_of_the_real_length_equal_the_30_s_window(n, make):
    """Computed over the piece's own length (+ the zeros its last frames see), not 30 s: the same numbers.

    Up to the rounding of the mel product: BLAS may sum a product of a few frames in another order than
    one of 3000 (1 ulp seen for pieces under 0.1 s); from 1 s on they were bit-identical here.
    """
    from minicpmo_cli.processing.audio import stft_length

    audio = make(n)
    assert audio.size == n
    ours, valid = log_mel_window(audio)
    assert (ours - _log_mel_over_30_s(audio)).abs().max() <= 1e-6
    assert valid == ours.shape[1] and stft_length(n) == min(480000, n + 201)


def test_features_on_a_device_are_returned_there():
    audio = _noise(1.2, seed=8)
    features, _ = extract_audio_features([[audio]], device="cpu")
    assert features.device.type == "cpu"
    assert torch.equal(features[0], log_mel_window(audio, torch.device("cpu"))[0])
