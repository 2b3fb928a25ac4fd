"""Golden case f: the full chat(generate_audio=True) run, seeded right before the call (slow: ~1 min)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_case_f_seeded_speech(golden_ckpt, golden_case):
    from minicpmo_cli import MiniCPMO

    meta, arrays = golden_case("f_tts_sampled")
    model = MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)
    model.init_tts()
    msgs = [{"role": "user", "content": [meta["messages"][0]["content"][0]["text"]]}]
    torch.manual_seed(1234)
    out = model.chat(msgs=msgs, sampling=False, max_new_tokens=16, num_beams=1, repetition_penalty=1.0,
                     use_tts_template=True, generate_audio=True, return_spk_embed=True)
    assert out.text == meta["result"]["chat_return_text"]
    np.testing.assert_allclose(out.spk_embeds.numpy(), arrays["spk_embeds"], atol=1e-4, rtol=0)
    assert out.sampling_rate == 24000
    assert out.audio_wav.shape == arrays["wav"].shape
    np.testing.assert_allclose(out.audio_wav, arrays["wav"], atol=1e-4, rtol=0)
