"""Streaming sessions: prefill several messages, then generate in 3-token rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmo_cli.errors import UsageError

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def model(golden_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)


def test_streamed_text_equals_chat_on_the_same_prompt(model):
    """system-as-user turn + user turn + the generate prompt is exactly the TTS-template chat prompt."""
    processor = model.processor
    system = processor.get_sys_prompt(mode="omni", language="en")
    user = {"role": "user", "content": ["What is the capital of France?"]}
    model.reset_session()
    model.streaming_prefill(session_id="s1", msgs=[system], processor=processor)
    model.streaming_prefill(session_id="s1", msgs=[user], processor=processor)
    pieces = list(model.streaming_generate(session_id="s1", processor=processor, use_tts=False,
                                           max_new_tokens=12, **GREEDY))
    assert all(set(p) == {"text"} for p in pieces) and len(pieces) == 4  # 3 tokens per round
    streamed = "".join(p["text"] for p in pieces)
    answer = model.chat(msgs=[system, user], use_tts_template=True, max_new_tokens=12, **GREEDY)
    assert streamed.replace("<|tts_eos|>", "") == answer


def test_session_turn_prefixes_and_cache_growth(model):
    processor = model.processor
    model.reset_session()
    model.streaming_prefill(session_id="s2", msgs=[{"role": "user", "content": ["sys"]}], processor=processor)
    first = model.llm_past_key_values.get_seq_length()
    audio = np.zeros(16000, dtype=np.float32)
    model.streaming_prefill(session_id="s2", msgs=[{"role": "user", "content": ["<unit>", audio]}],
                            processor=processor)
    # "<|im_start|>user\n" + "<unit>" + one second of audio (<|audio_start|> + 25 + <|audio_end|>)
    assert model.llm_past_key_values.get_seq_length() == first + 3 + 1 + 27
    assert model.new_user_msg is False and model.audio_past_key_values is not None
    list(model.streaming_generate(session_id="s2", processor=processor, use_tts=False, max_new_tokens=3, **GREEDY))
    assert model.llm_generated and model.new_user_msg
    model.streaming_prefill(session_id="s3", msgs=[{"role": "user", "content": ["new"]}], processor=processor)
    assert model.session_id == "s3" and not model.llm_generated  # a new session id starts over


def test_generate_needs_a_prefill(model):
    model.reset_session()
    with pytest.raises(UsageError):
        list(model.streaming_generate(session_id="x", processor=model.processor, use_tts=False))


def _conversation(session, processor, question: str, audio_seed: int):
    """prefill system + a user turn with audio, answer, then a second user turn and answer; yields each step
    so two conversations can be interleaved."""
    rng = np.random.default_rng(audio_seed)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    session.prefill("conv", [processor.get_sys_prompt(mode="omni", language="en")], processor=processor)
    yield
    session.prefill("conv", [{"role": "user", "content": ["<unit>", audio, question]}], processor=processor)
    yield
    first = "".join(p["text"] for p in session.generate(processor=processor, use_tts=False, max_new_tokens=7,
                                                         **GREEDY))
    yield
    session.prefill("conv", [{"role": "user", "content": ["and then?"]}], processor=processor)
    yield
    second = "".join(p["text"] for p in session.generate(processor=processor, use_tts=False, max_new_tokens=5,
                                                          **GREEDY))
    yield first, second


def _run_all(*conversations):
    """Step the conversations round robin; their final results in order."""
    results = [None] * len(conversations)
    live = list(enumerate(conversations))
    while live:
        for entry in list(live):
            index, steps = entry
            try:
                value = next(steps)
            except StopIteration:
                live.remove(entry)
                continue
            if value is not None:
                results[index] = value
    return results


def test_two_sessions_interleaved_equal_each_alone(model):
    """Sessions own their caches: interleaving two conversations on one model changes neither answer, and the
    model's default session (the guide's API) is untouched by them."""
    processor = model.processor
    model.reset_session()
    model.streaming_prefill(session_id="default", msgs=[{"role": "user", "content": ["hello"]}], processor=processor)
    default_length = model.llm_past_key_values.get_seq_length()
    alone_a = _run_all(_conversation(model.new_session(), processor, "what is this?", 1))[0]
    alone_b = _run_all(_conversation(model.new_session(), processor, "say something", 2))[0]
    a, b = model.new_session(), model.new_session()
    together = _run_all(_conversation(a, processor, "what is this?", 1), _conversation(b, processor, "say something", 2))
    assert together == [alone_a, alone_b]
    assert a.llm_cache is not b.llm_cache and a.llm_cache.get_seq_length() > 0
    assert model.session_id == "default" and model.llm_past_key_values.get_seq_length() == default_length


def test_no_forward_hooks_are_left_on_the_model(model):
    model.chat(msgs=[{"role": "user", "content": "hi"}], use_tts_template=True, max_new_tokens=3,
               return_spk_embed=True, **GREEDY)
    assert not any(module._forward_hooks for module in model.modules())
