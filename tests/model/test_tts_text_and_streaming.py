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
    # 25 frames x 512 samples per yield; the first lacks the 2048 samples the next cross-fade changes
    assert chunks[0].wav.shape == (12800 - 2048,) and all(c.wav.shape == (12800,) for c in chunks[1:-1])
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
    # each segment flushes its own tail; the first chunk of the first segment lacks the 2048 cross-faded
    # samples, a continued segment's first chunk has 4 re-decoded context frames more (29 frames - 2048 samples)
    assert sizes[0] == 12800 - 2048 and sizes.count(12800) >= len(sizes) - 3


class CountingSampler:
    """The reference sampler, recording every frame drawn (so a test knows how many frames exist)."""

    def __init__(self, sampler):
        self.sampler, self.frames = sampler, []

    def sample(self, probs):
        drawn = self.sampler.sample(probs)
        self.frames.append(drawn.flatten().tolist())
        return drawn


def _stream_recorded(tts, vocos, tokenizer, spk, monkeypatch, **options):
    """stream_speech, with the frames drawn before each chunk, every decoded wav and the codes drawn."""
    from minicpmo_cli.generation import speech

    samplers, decoded = [], []
    make = speech.make_sampler
    monkeypatch.setattr(speech, "make_sampler", lambda seed=None: samplers.append(CountingSampler(make(seed)))
                        or samplers[-1])
    decode = speech.decode_codes
    monkeypatch.setattr(speech, "decode_codes", lambda *a: decoded.append(decode(*a)) or decoded[-1])
    chunks, arrivals = [], []
    for chunk in speech.stream_speech(tts, vocos, tokenizer, spk, ["hello", " world", ", the voice."], seed=5,
                                      max_new_tokens=120, **options):
        chunks.append(chunk.wav)
        arrivals.append(len(samplers[0].frames))
    return chunks, arrivals, decoded, samplers[0].frames


def test_first_chunk_is_yielded_when_decoded_and_the_join_is_the_held_back_stream(golden_pipeline, tokenizer,
                                                                                   golden_case, monkeypatch):
    """Before, each decoded chunk was held back until the next one existed (for the cross-fade); now only its
    last 2048 samples wait. Joined, the chunks equal that held-back stream (re-built here from the same
    decoded wavs with the reference's overlap-add) to float rounding: the weights' division is no longer
    applied to samples outside the cross-fade."""
    from minicpmo_cli.generation.speech import _overlap_add_pair

    tts, vocos = golden_pipeline
    spk = torch.from_numpy(golden_case("e_tts_pieces")[1]["spk_embeds"])
    chunks, arrivals, decoded, frames = _stream_recorded(tts, vocos, tokenizer, spk, monkeypatch)
    assert arrivals[0] == 25 and chunks[0].shape == ((25 - 4) * 512,)  # the first 25 frames, at once
    assert arrivals[1] == 50 and len(decoded) == len(chunks) - 1  # the tail comes after the last decode
    held = [decoded[0]]
    for wav in decoded[1:]:
        ready, rest = _overlap_add_pair(held.pop(), wav, overlap=2048)
        held += [ready, rest]
    expected = torch.cat(held).numpy()
    joined = np.concatenate(chunks)
    assert joined.shape == expected.shape == (512 * sum(1 for f in frames if 625 not in f),)
    np.testing.assert_allclose(joined, expected, atol=1e-6, rtol=0)

    # Other chunk sizes: the same codes drawn, the first chunk after 10 frames, then 15 frames a chunk.
    small, arrivals, _, same_frames = _stream_recorded(tts, vocos, tokenizer, spk, monkeypatch,
                                                       first_chunk_frames=10, chunk_frames=15)
    assert same_frames == frames and arrivals[:3] == [10, 25, 40]
    assert small[0].shape == ((10 - 4) * 512,) and all(c.shape == (15 * 512,) for c in small[1:-2])
    assert sum(c.shape[0] for c in small) == joined.shape[0]  # the vocoder looks ahead: samples differ a little


@pytest.mark.parametrize(("first", "every"), [(4, 25), (25, 0), (2.5, 25), (25, 5000)])
def test_bad_chunk_sizes_are_usage_errors(first, every):
    from minicpmo_cli.errors import UsageError
    from minicpmo_cli.generation.speech import check_chunk_frames

    with pytest.raises(UsageError, match="chunk_frames must be a whole number of frames from 5 to 2048"):
        check_chunk_frames(first, every)
