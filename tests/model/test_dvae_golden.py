"""DVAE decode (codes -> mel) against the reference (case e), plus layout checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minicpmo_cli.model.dvae import DVAE, decode_codes_to_mel


@pytest.fixture(scope="module")
def golden_dvae(golden_ckpt):
    from safetensors.torch import load_file

    from minicpmo_cli.model.config import MiniCPMOConfig

    config = MiniCPMOConfig(**json.loads((golden_ckpt / "config.json").read_text())).tts_config
    dvae = DVAE(config)
    prefix = "tts.dvae."
    state = {k[len(prefix) :]: v for k, v in load_file(golden_ckpt / "model.safetensors").items() if k.startswith(prefix)}
    dvae.load_state_dict(state, strict=True)  # encoder-side weights included: every name is accounted for
    return dvae.float().eval()


def test_vq_features_match_reference(golden_dvae, golden_case):
    _, arrays = golden_case("e_tts_pieces")
    codes = torch.from_numpy(arrays["dvae_codes"])  # (T, num_vq)
    feats = golden_dvae.vq_features(codes.T[None])
    assert feats.shape == (1, 512, 2 * codes.shape[0])
    np.testing.assert_allclose(feats.numpy(), arrays["dvae_vq_feats"], atol=1e-4, rtol=0)


def test_mel_matches_reference(golden_dvae, golden_case):
    _, arrays = golden_case("e_tts_pieces")
    mel = decode_codes_to_mel(golden_dvae, torch.from_numpy(arrays["dvae_codes"])[None])
    assert mel.shape == (1, 100, 96)
    np.testing.assert_allclose(mel.numpy(), arrays["dvae_mel"], atol=1e-4, rtol=0)


def test_fsq_code_values_and_batch_padding(golden_dvae):
    # index -> base-5 digits (least significant first) -> (d - 2) / 2
    codes = golden_dvae.vq_layer.indices_to_codes(torch.tensor([0, 624, 1 + 5 * 2 + 25 * 3 + 125 * 4]))
    assert codes.tolist() == [[-1.0] * 4, [1.0] * 4, [-0.5, 0.0, 0.5, 1.0]]
    short, long = torch.randint(0, 625, (3, 4)), torch.randint(0, 625, (5, 4))
    mel = decode_codes_to_mel(golden_dvae, [short, long])
    assert mel.shape == (2, 100, 10) and torch.isfinite(mel).all()
    alone = decode_codes_to_mel(golden_dvae, [long])
    torch.testing.assert_close(mel[1], alone[0], atol=1e-4, rtol=0)  # batch vs single: float noise only
