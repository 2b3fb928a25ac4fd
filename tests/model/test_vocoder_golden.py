"""Vocos decode (mel -> 24 kHz wav) against the reference (case e), and the ISTFT "same" layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmo_cli.model.vocoder import ISTFTSame, Vocos, load_vocos


@pytest.fixture(scope="module")
def golden_vocos(golden_ckpt):
    return load_vocos(golden_ckpt / "assets" / "Vocos.pt")


def test_vocos_wav_matches_reference(golden_vocos, golden_case):
    _, arrays = golden_case("e_tts_pieces")
    wav = golden_vocos.decode(torch.from_numpy(arrays["dvae_mel"]))
    assert wav.shape == (1, 96 * 256) and wav.dtype == torch.float32
    np.testing.assert_allclose(wav[0].numpy(), arrays["vocos_wav"], atol=1e-4, rtol=0)


def test_vocos_checkpoint_names_and_window(golden_ckpt, golden_vocos):
    state = torch.load(golden_ckpt / "assets" / "Vocos.pt", weights_only=True)
    ours = set(Vocos().state_dict())
    assert ours == {k for k in state if not k.startswith("feature_extractor.")}
    assert torch.equal(golden_vocos.head.istft.window, torch.hann_window(1024))


def test_istft_same_padding_inverts_a_same_padded_stft():
    """"same" = frames centred with (win - hop)/2 padding: T frames give exactly T * hop samples, and the
    inverse of such an STFT reproduces the signal (torch.istft(center=True) would not line up)."""
    n_fft, hop, frames = 64, 16, 20
    istft = ISTFTSame(n_fft, hop)
    signal = torch.randn(1, frames * hop, dtype=torch.float64)
    pad = (n_fft - hop) // 2
    padded = torch.nn.functional.pad(signal, (pad, pad))
    window = istft.window.double()
    chunks = padded.unfold(-1, n_fft, hop)[:, :frames] * window  # (1, T, n_fft)
    spec = torch.fft.rfft(chunks, dim=-1).transpose(1, 2)
    istft = istft.double()
    out = istft(spec)
    assert out.shape == signal.shape
    torch.testing.assert_close(out, signal, atol=1e-9, rtol=0)
