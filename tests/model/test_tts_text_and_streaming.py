"""TTS text handling with the golden ChatTTS tokenizer, long-text splitting and the streaming pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minicpmo_cli.generation.speech import generate_speech, stream_speech
from minicpmo_cli.processing.tts_text import (
    count_tts_tokens,
    extract_tts_text,
    load_tts_tokenizer,
    prepare_tts_text,
    spell_digits,
    split_tts_text,
)


@pytest.fixture(scope="module")
def tokenizer(golden_ckpt):
    return load_tts_tokenizer(golden_ckpt / "assets" / "chattts_tokenizer")


def test_extract_and_prepare(tokenizer):
    assert extract_tts_text("<|tts_bos|>hello world<|tts_eos|><|im_end|>") == "hello world"
    prompt, n = prepare_tts_text(tokenizer, "hello world")
    assert n == count_tts_tokens(tokenizer, "hello world") and prompt.startswith("[Stts][spk_emb]hello world[Etts][PAD]") and prompt.endswith("[PAD][Ptts]")
    assert len(tokenizer.encode(prompt, add_special_tokens=False)) == 303
    long_prompt, n = prepare_tts_text(tokenizer, "hello " * 400)  # reference: cut at 300, no [Etts]
    assert n == 300 and "[Etts]" not in long_prompt
    assert spell_digits("I have 23 apples") == "I have two three apples"
    assert spell_digits("我有2个") == "我有二个"


def test_split_long_text_keeps_every_word(tokenizer):
    sentence = "hello world, the voice of the helpful assistant. "
    text = sentence * 40  # ~600 tokens
    pieces = split_tts_text(tokenizer, text)
    assert len(pieces) >= 3
    assert all(count_tts_tokens(tokenizer, p) < 300 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert split_tts_text(tokenizer, "short text.") == ["short text."]
    no_breaks = "a" * 2000  # one long word: cut at token boundaries
    assert all(count_tts_tokens(tokenizer, p) < 300 for p in split_tts_text(tokenizer, no_breaks))


@pytest.fixture(scope="module")
def golden_pipeline(golden_ckpt, tokenizer):
    from safetensors.torch import load_file

    from minicpmo_cli.model.config import MiniCPMOConfig
    from minicpmo_cli.model.tts import ConditionalChatTTS
    from minicpmo_cli.model.vocoder import load_vocos

    config = MiniCPMOConfig(**json.loads((golden_ckpt / "config.json").read_text())).tts_config
    tts = ConditionalChatTTS(config)
    state = {k[4:]: v for k, v in load_file(golden_ckpt / "model.safetensors").items() if k.startswith("tts.")}
    tts.load_state_dict(state)
    return tts.float().eval(), load_vocos(golden_ckpt / "assets" / "Vocos.pt", config)


def test_streaming_chunks(golden_pipeline, tokenizer, golden_case):
    tts, vocos = golden_pipeline
    _, arrays = golden_case("e_tts_pieces")
    spk = torch.from_numpy(arrays["spk_embeds"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunks = list(stream_speech(tts, vocos, tokenizer, spk, ["hello", " world", ", the voice."], seed=5, max_new_tokens=120))
        again = generate_speech(tts, vocos, tokenizer, spk, "hello world, the voice.", seed=5, streaming=True, max_new_tokens=120)
    finally:
        torch.set_num_threads(before)
    assert len(chunks) >= 2
    assert all(c.wav.dtype == np.float32 and c.sample_rate == 24000 for c in chunks)
    assert all(c.wav.shape == (12800,) for c in chunks[:-1])  # 25 frames x 512 samples per yield
    assert "".join(c.text for c in chunks) == "hello world, the voice."
    joined = np.concatenate([c.wav for c in chunks])
    assert np.isfinite(joined).all()
    assert again.shape[0] > 0 and np.isfinite(again).all()


@pytest.mark.slow
def test_streaming_long_text_continues_in_a_new_segment(golden_pipeline, tokenizer, golden_case, monkeypatch):
    """Past 120 TTS tokens a sentence end closes the segment; the next one is primed with the last 5 text
    ids and the last 50 frames (49 prefilled + 1 as next input), and every character is reported once."""
    from minicpmo_cli.generation.speech import as_text_rounds

    tts, vocos = golden_pipeline
    _, arrays = golden_case("e_tts_pieces")
    from minicpmo_cli.generation import speech

    primed = []
    original = speech.prefill_audio
    monkeypatch.setattr(speech, "prefill_audio", lambda tts, state, ids, *a: primed.append(ids.shape) or original(tts, state, ids, *a))
    text = "hello world, the voice of the helpful assistant. " * 9  # 135 tokens
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunks = list(stream_speech(tts, vocos, tokenizer, torch.from_numpy(arrays["spk_embeds"]), as_text_rounds(text), seed=1))
    finally:
        torch.set_num_threads(before)
    assert primed == [(1, 49, 4)]
    assert "".join(c.text for c in chunks) == text
    sizes = [c.wav.shape[0] for c in chunks]
    # each segment flushes its own tail; a continued segment starts with 29 frames (4 re-decoded context frames)
    assert sizes.count(12800) >= len(sizes) - 3 and 14848 in sizes
