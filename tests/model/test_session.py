"""Streaming omni sessions on a tiny random checkpoint: the KV cache grows by appending, and where the
reference's streaming and one-shot paths agree (the same prompt; image embeddings; a single <= 1 s audio piece)
ours agree too: KV cache, generated ids, speaker state. Turn prefixes and errors follow the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation import session

OMNI_PROCESSING = {"omni_input": True, "use_tts_template": True, "max_slice_nums": 1, "use_image_id": False}
GREEDY = {"sampling": True, "top_k": 1, "repetition_penalty": 1.0}  # deterministic on both paths


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from minicpmo_cli.api.engine import LoadOptions, load
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_session"))
    return load(LoadOptions(model=str(folder), device="cpu", dtype="float32"), tts=True)


def frame(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40 + seed, 56, 3), dtype=np.uint8))


def sound(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    return (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)


def cache_keys(model) -> list[torch.Tensor]:
    return [layer.keys.clone() for layer in model.llm_past_key_values.layers]


def one_shot_cache(model, processor, msgs):
    """Prompt ids and the LLM cache of the non-streaming path (processor + get_inputs_embeds) for ``msgs``."""
    inputs = processor.apply_chat_template(msgs=msgs, **OMNI_PROCESSING)
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
        _, cache = session._llm_step(model, embeds, None)
    return inputs, cache


def prefill_all(model, processor, msgs, session_id="s"):
    model.reset_session()
    for msg in msgs:
        model.streaming_prefill(session_id=session_id, msgs=[msg], processor=processor)


def generation_prompt_length(processor) -> int:
    return len(processor.tokenizer.encode(session.GENERATION_PROMPT, add_special_tokens=False))


def test_prefill_appends_to_the_cache_without_recomputing(engine):
    model, processor = engine.model, engine.processor
    model.reset_session()
    model.streaming_prefill(session_id="grow", msgs=[model.get_sys_prompt(mode="omni", language="en")],
                            processor=processor)
    before = cache_keys(model)
    for index in range(3):
        unit = {"role": "user", "content": ["<unit>", frame(index), sound(index)]}
        model.streaming_prefill(session_id="grow", msgs=[unit], processor=processor)
        after = cache_keys(model)
        assert after[0].shape[2] > before[0].shape[2]
        for old, new in zip(before, after):  # earlier positions are kept bit for bit
            assert torch.equal(new[:, :, : old.shape[2]], old)
        before = after
    assert session.session_length(model) == before[0].shape[2]


def test_single_unit_session_equals_one_shot_prompt(engine):
    model, processor = engine.model, engine.processor
    msgs = [model.get_sys_prompt(mode="omni", language="en"),
            {"role": "user", "content": ["<unit>", frame(1), sound(1)]}]
    prefill_all(model, processor, msgs)
    inputs, cache = one_shot_cache(model, processor, msgs)
    length = session.session_length(model)
    assert length == inputs["input_ids"].shape[1] - generation_prompt_length(processor)
    for streamed, whole in zip(model.llm_past_key_values.layers, cache.layers):
        torch.testing.assert_close(streamed.keys, whole.keys[:, :, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(streamed.values, whole.values[:, :, :length], atol=1e-4, rtol=1e-4)


def test_many_units_of_frames_and_text_equal_one_shot_prompt(engine):
    """Without audio every unit's embeddings are independent of the others, so many units agree too."""
    model, processor = engine.model, engine.processor
    units = [{"role": "user", "content": ["<unit>", frame(i)]} for i in range(3)]
    units.append({"role": "user", "content": ["what is shown?"]})
    prefill_all(model, processor, [model.get_sys_prompt(mode="omni", language="en")] + units)
    flat = [item for unit in units for item in unit["content"]]
    inputs, cache = one_shot_cache(model, processor, [model.get_sys_prompt(mode="omni", language="en"),
                                                      {"role": "user", "content": flat}])
    length = session.session_length(model)
    assert length == inputs["input_ids"].shape[1] - generation_prompt_length(processor)
    for streamed, whole in zip(model.llm_past_key_values.layers, cache.layers):
        torch.testing.assert_close(streamed.keys, whole.keys[:, :, :length], atol=1e-4, rtol=1e-4)


def test_streaming_generate_ids_and_text_match_generate(engine):
    model, processor = engine.model, engine.processor
    msgs = [model.get_sys_prompt(mode="omni", language="en"),
            {"role": "user", "content": ["<unit>", frame(2), sound(2)]}]
    inputs = processor.apply_chat_template(msgs=msgs, **OMNI_PROCESSING)
    from minicpmo_cli.generation.text import guide_decode, run_llm_generate

    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    settings = guide_decode(True, 10, 0, GREEDY)
    expected, _ = run_llm_generate(model, embeds, None, processor.tokenizer, settings)
    prefill_all(model, processor, msgs)
    prompt_ids = processor.tokenizer(session.GENERATION_PROMPT, return_tensors="pt", add_special_tokens=False)
    rounds = list(session._llm_rounds(model, processor.tokenizer, prompt_ids["input_ids"], settings))
    assert [i for r in rounds for i in r.ids] == expected[0].tolist()
    assert all(len(r.ids) <= session.ROUND_TOKENS for r in rounds)

    one_shot = model.generate(**inputs, processor=processor, max_new_tokens=10, **GREEDY)
    prefill_all(model, processor, msgs)
    items = list(model.streaming_generate(session_id="s", processor=processor, use_tts=False,
                                          max_new_tokens=10, **GREEDY))
    assert all(isinstance(item, dict) and set(item) == {"text"} for item in items)
    streamed = "".join(item["text"] for item in items)
    # Ids held back for an unfinished character at the very end are dropped by the streaming path only.
    assert one_shot.startswith(streamed)
    assert one_shot == streamed or "\ufffd" in one_shot[len(streamed):]


def test_speech_stream_items_and_speaker_state(engine):
    model, processor = engine.model, engine.processor
    msgs = [model.get_sys_prompt(mode="omni", language="en"),
            {"role": "user", "content": ["<unit>", frame(3), sound(3, 0.6)]}]
    inputs = processor.apply_chat_template(msgs=msgs, **OMNI_PROCESSING)
    expected = model.generate(**inputs, processor=processor, max_new_tokens=6, return_spk_embed=True, **GREEDY)
    prefill_all(model, processor, msgs)
    text_only = "".join(i["text"] for i in model.streaming_generate(
        session_id="s", processor=processor, use_tts=False, max_new_tokens=6, **GREEDY))
    prefill_all(model, processor, msgs)
    torch.manual_seed(0)
    items = list(model.streaming_generate(session_id="s", processor=processor, use_tts=True,
                                          tts_output_chunk_size=25, max_new_tokens=6, tts_max_new_tokens=25,
                                          **GREEDY))
    assert items, "speech stream yielded nothing"
    for item in items:
        assert isinstance(item.text, str) and item["text"] == item.text
        assert isinstance(item.audio_wav, np.ndarray) and item.audio_wav.dtype == np.float32
        assert item.audio_wav.ndim == 1 and item.sampling_rate == 24000
    assert sum(len(item.audio_wav) for item in items) > 0
    assert "".join(item.text for item in items) == text_only
    torch.testing.assert_close(items[0].spk_embeds, expected.spk_embeds, atol=1e-4, rtol=1e-4)
    assert all(item.spk_embeds is None for item in items[1:])


def test_turn_prefixes_follow_the_reference(engine):
    model, processor = engine.model, engine.processor
    tokenizer = processor.tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    model.reset_session()
    model.streaming_prefill(session_id="t", msgs=[{"role": "system", "content": ["Be brief."]}],
                            processor=processor)
    assert session.session_length(model) == count("<|im_start|>system\nBe brief.<|im_end|>\n")
    steps = [("hello", "<|im_start|>user\nhello"), (" again", " again")]  # later chunks of a turn: raw
    for text, rendered in steps:
        start = session.session_length(model)
        model.streaming_prefill(session_id="t", msgs=[{"role": "user", "content": [text]}], processor=processor)
        assert session.session_length(model) - start == count(rendered)
    start = session.session_length(model)
    answer = model.streaming_generate(session_id="t", processor=processor, use_tts=False, max_new_tokens=2,
                                      sampling=False)
    list(answer)
    assert model.llm_generated and not model.llm_generate_completed  # stopped by max_new_tokens
    # the generation prompt and the first answer token; the last token never enters the cache
    assert session.session_length(model) - start == count(session.GENERATION_PROMPT) + 1
    start = session.session_length(model)
    model.streaming_prefill(session_id="t", msgs=[{"role": "user", "content": ["next"]}], processor=processor)
    # an answer that was cut short is closed with <|tts_eos|>
    grown = session.session_length(model) - start
    assert grown == count("<|tts_eos|><|im_end|>\n<|im_start|>user\nnext")
    assert session.turn_prefix(True, True) == "<|im_end|>\n<|im_start|>user\n"
    # a new session id starts over
    model.streaming_prefill(session_id="u", msgs=[{"role": "user", "content": ["hi"]}], processor=processor)
    assert model.session_id == "u" and session.session_length(model) == count("<|im_start|>user\nhi<|im_end|>\n")


def test_session_errors(engine):
    model, processor = engine.model, engine.processor
    model.reset_session()
    with pytest.raises(UsageError):
        model.streaming_generate(session_id="x", processor=processor)
    with pytest.raises(UsageError):
        model.streaming_prefill(session_id=None, msgs=[{"role": "user", "content": ["a"]}], processor=processor)
    with pytest.raises(UsageError):
        model.streaming_prefill(session_id="x", msgs=[{"role": "user", "content": ["a"]}] * 2, processor=processor)
    with pytest.raises(UsageError):
        model.streaming_prefill(session_id="x", msgs=[{"role": "robot", "content": ["a"]}], processor=processor)
