"""generate(use_tts_template=True) on a plain-template prompt: the ids become the TTS template's exactly."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    return MiniCPMOProcessor.from_pretrained(tiny_ckpt)


def _rewrite(processor, msgs):
    from minicpmo_cli.processing.tts_prompt import apply_tts_template, needs_tts_prompt

    plain = processor.apply_chat_template(msgs=msgs)
    assert needs_tts_prompt(plain)
    data = {k: plain[k] for k in ("input_ids", "image_bound", "audio_bounds", "spk_bounds")}
    return apply_tts_template(data, plain["attention_mask"], processor.tokenizer)


@pytest.mark.parametrize("with_image", [False, True])
def test_rewritten_prompt_equals_the_tts_template(processor, with_image):
    from PIL import Image

    content = ([Image.new("RGB", (320, 200), "red")] if with_image else []) + ["Speak like a pirate."]
    msgs = [{"role": "user", "content": content}]
    data, mask = _rewrite(processor, msgs)
    expected = processor.apply_chat_template(msgs=msgs, use_tts_template=True)
    assert data["input_ids"].tolist() == expected["input_ids"].tolist()
    assert mask.tolist() == expected["attention_mask"].tolist()
    assert [b.tolist() for b in data["spk_bounds"]] == [b.tolist() for b in expected["spk_bounds"]]
    assert [b.tolist() for b in data["image_bound"]] == [b.tolist() for b in expected["image_bound"]]


def test_a_prompt_with_a_system_turn_keeps_it(processor):
    msgs = [{"role": "system", "content": ["Be brief."]}, {"role": "user", "content": ["Hi."]}]
    data, _ = _rewrite(processor, msgs)
    expected = processor.apply_chat_template(msgs=msgs, use_tts_template=True)
    assert data["input_ids"].tolist() == expected["input_ids"].tolist()
