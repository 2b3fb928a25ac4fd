"""ConditionalChatTTS against the reference's golden vectors (cases e and f), float32."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from minicpmo_cli.generation.speech import codes_to_wav, generate_codes, generate_speech
from minicpmo_cli.generation.tts_decode import FrameSampling, TTSState, generate_frames, prefill_text
from minicpmo_cli.model.tts import ConditionalChatTTS
from minicpmo_cli.model.tts_sampling import make_logits_processors
from minicpmo_cli.model.vocoder import load_vocos
from minicpmo_cli.processing.tts_text import (
    build_streaming_text_mask,
    encode_tts_prompt,
    load_tts_tokenizer,
    prepare_tts_text,
)


@contextlib.contextmanager
def one_thread():
    """The sampled run is ~1400 tiny sequential steps: one thread avoids OpenMP overhead (the reference
    README reports identical codes with 1 and 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def golden_tts(golden_ckpt):
    from safetensors.torch import load_file

    from minicpmo_cli.model.config import MiniCPMOConfig

    config = MiniCPMOConfig(**json.loads((golden_ckpt / "config.json").read_text())).tts_config
    tts = ConditionalChatTTS(config)
    state = {k[len("tts.") :]: v for k, v in load_file(golden_ckpt / "model.safetensors").items() if k.startswith("tts.")}
    tts.load_state_dict(state, strict=True)
    tts.float().eval()
    tokenizer = load_tts_tokenizer(golden_ckpt / "assets" / "chattts_tokenizer")
    vocos = load_vocos(golden_ckpt / "assets" / "Vocos.pt", config)
    return tts, tokenizer, vocos


def test_tts_prompt_ids_and_text_mask(golden_tts, golden_case):
    _, tokenizer, _ = golden_tts
    meta, arrays = golden_case("e_tts_pieces")
    prompt, num_tokens = prepare_tts_text(tokenizer, meta["tts_text"]["fixed_text"])
    assert prompt == meta["tts_text"]["prepared_text"]
    assert num_tokens == meta["tts_text"]["text_token_count"]
    ids = encode_tts_prompt(tokenizer, prompt)
    assert ids.tolist() == arrays["tts_input_ids"].tolist()
    assert build_streaming_text_mask(num_tokens).tolist() == meta["tts_text"]["streaming_tts_text_mask"]


def test_tts_inputs_embeds(golden_tts, golden_case):
    tts, _, _ = golden_tts
    _, arrays = golden_case("e_tts_pieces")
    embeds = tts.merge_inputs_embeds(torch.from_numpy(arrays["tts_input_ids"]), torch.from_numpy(arrays["spk_embeds"]))
    assert embeds.shape == (1, 303, 64)
    np.testing.assert_allclose(embeds.numpy(), arrays["tts_inputs_embeds"], atol=1e-4, rtol=0)


def test_teacher_forced_step_logits(golden_tts, golden_case):
    tts, _, _ = golden_tts
    meta, arrays = golden_case("e_tts_pieces")
    ids = torch.from_numpy(arrays["tts_input_ids"])
    mask = torch.tensor(meta["tts_text"]["streaming_tts_text_mask"], dtype=torch.int8)
    state = TTSState(tts)
    prefill_text(tts, state, ids[:, :12], 0, torch.from_numpy(arrays["spk_embeds"]))
    sampling = FrameSampling.for_tts(tts)
    sampling.warpers, sampling.processors = make_logits_processors(0.7, 20, 1.0)
    logits = []
    forced = torch.from_numpy(arrays["teacher_forcing_codes"])
    for step in range(3):
        generate_frames(tts, state, sampling, mask, 1, logits_out=logits)
        assert state.audio_input_ids.shape == (1, 304 + step, 4)
        assert state.cache.length == 303 + step
        if step < 2:
            state.ids[0, state.progress - 1] = forced[step]
    np.testing.assert_allclose(torch.stack(logits).numpy(), arrays["tf_step_logits"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_seeded_codes_match_reference(golden_tts, golden_case):
    """The reference call: torch.manual_seed(1234) right before; the TTS is the first RNG consumer."""
    tts, tokenizer, _ = golden_tts
    meta, arrays = golden_case("f_tts_sampled")
    with one_thread():
        torch.manual_seed(1234)
        codes = generate_codes(tts, tokenizer, torch.from_numpy(arrays["spk_embeds"]), meta["result"]["tts_text_input"])
    assert codes.shape == tuple(meta["result"]["audio_codes_shape"])
    assert codes[0, :8].tolist() == meta["result"]["first_codes"]
    assert torch.equal(codes, torch.from_numpy(arrays["audio_codes"]))


@pytest.mark.slow
def test_generate_speech_seed_matches_reference_wav(golden_tts, golden_case):
    tts, tokenizer, vocos = golden_tts
    meta, arrays = golden_case("f_tts_sampled")
    before = torch.get_rng_state()
    with one_thread():
        wav = generate_speech(
            tts, vocos, tokenizer, torch.from_numpy(arrays["spk_embeds"]),
            meta["result"]["tts_text_input"] + "<|tts_eos|>", seed=1234,
        )
    assert torch.equal(torch.get_rng_state(), before)  # a seed uses a private RNG
    assert wav.dtype == np.float32 and wav.shape == (meta["result"]["wav_samples"],)
    np.testing.assert_allclose(wav, arrays["wav"], atol=1e-4, rtol=0)


def test_codes_to_wav_of_reference_codes(golden_tts, golden_case):
    tts, _, vocos = golden_tts
    _, arrays = golden_case("e_tts_pieces")
    wav = codes_to_wav(tts, vocos, torch.from_numpy(arrays["dvae_codes"])[None])
    np.testing.assert_allclose(wav, arrays["vocos_wav"], atol=1e-4, rtol=0)
