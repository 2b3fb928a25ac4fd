"""Token counts come from the generation itself (generation/usage.py), not from hooks on the shared model:
the prompt's length, and the generated ids (a stop token included) of plain, streamed and beam answers."""

from __future__ import annotations

import pytest
import torch

from minicpmo_cli.generation.usage import Usage, generated_count


@pytest.fixture(scope="module")
def guide(tiny_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(tiny_ckpt, dtype=torch.float32)


def prompt(guide, text: str = "Say something."):
    return guide.processor.apply_chat_template(msgs=[{"role": "user", "content": text}])


def stop_ids(guide) -> list[int]:
    tokenizer = guide.processor.tokenizer
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def test_generated_count_stops_at_the_first_stop_id():
    rows = torch.tensor([[5, 7, 9, 0, 0], [5, 2, 8, 4, 1], [9, 0, 0, 0, 0]])  # stopped, full length, stopped at once
    assert generated_count(rows, [9]) == 3 + 5 + 1


def test_plain_answer_counts_its_ids(guide):
    from minicpmo_cli.generation.decode import DecodeSettings, generate_ids

    inputs = prompt(guide)
    usage = Usage()
    guide.generate(**inputs, processor=guide.processor, sampling=False, num_beams=1, max_new_tokens=7,
                   repetition_penalty=1.0, usage=usage)
    with torch.inference_mode():
        embeds, _ = guide.get_inputs_embeds(dict(inputs))
    [ids] = generate_ids(guide.llm, embeds, None, DecodeSettings(max_new_tokens=7, stop_ids=tuple(stop_ids(guide))))
    assert usage.prompt_tokens == inputs["input_ids"].shape[-1]
    assert usage.completion_tokens == len(ids) > 0


def test_streamed_answer_counts_as_it_goes_and_when_stopped(guide):
    inputs = prompt(guide)
    whole, stopped = Usage(), Usage()
    torch.manual_seed(3)
    pieces = list(guide.generate(**inputs, processor=guide.processor, stream=True, max_new_tokens=9, usage=whole))
    assert pieces and whole.completion_tokens >= 1 and whole.completion_tokens <= 9
    torch.manual_seed(3)
    stream = guide.generate(**inputs, processor=guide.processor, stream=True, max_new_tokens=9, usage=stopped)
    next(stream)
    stream.close()  # the caller stopped reading: the generation ends at its next token
    assert 1 <= stopped.completion_tokens <= whole.completion_tokens


def test_beam_answer_counts_its_ids(guide):
    inputs = prompt(guide)
    usage = Usage()
    guide.generate(**inputs, processor=guide.processor, sampling=False, max_new_tokens=5, usage=usage)
    assert usage.prompt_tokens == inputs["input_ids"].shape[-1] and 1 <= usage.completion_tokens <= 5


def test_no_hook_is_left_on_the_model(guide):
    inputs = prompt(guide)
    guide.generate(**inputs, processor=guide.processor, sampling=False, num_beams=1, max_new_tokens=3,
                   usage=Usage())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in guide.modules())
