"""Limits checked before any model work, so that no input can make a command run for hours or run out of memory.

The language model reads at most ``max_position_embeddings`` positions (32768 for MiniCPM-o 2.6). A prompt is
measured the way the processor builds it: the chat template's text with every image and audio placeholder
expanded, tokenized; no pixels or mel features are computed. A prompt that does not fit is a usage error
(exit 2) whose one line gives the limit and the size. Media that would be decoded whole before being
measured (a video's sound track, omni units) are measured from the container's header first.
"""

from __future__ import annotations

import math
from typing import Any

from minicpmo_cli.errors import UsageError
from minicpmo_cli.units import INPUT_SAMPLE_RATE

DEFAULT_CONTEXT = 32768  # positions: MiniCPM-o 2.6's LLM (Qwen2.5-7B) when a config does not say
MIN_ANSWER_TOKENS = 16  # a prompt must leave at least this much room for the answer
MAX_INSTRUCTION_CHARS = 16384  # asr --prompt: an instruction, sent with every 30 s piece
MAX_STDIN_BYTES = 2 << 30  # audio piped in is held in memory: more than this should be given as a file


class PromptTooLong(UsageError):
    """The prompt does not fit the model's context."""


def context_limit(config: Any) -> int:
    """The LLM's context in positions, from the model's config (a MiniCPM-o config, or its llm_config)."""
    for source in (config, getattr(config, "llm_config", None), getattr(config, "text_config", None)):
        value = getattr(source, "max_position_embeddings", None) if source is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def prompt_token_count(processor, msgs, omni_input: bool = False, use_tts_template: bool = False,
                       max_slice_nums: int | None = None, use_image_id: bool | None = None,
                       chunk_input: bool = True) -> int:
    """Tokens of the longest prompt of `msgs` (one conversation or a batch), as the processor would make it."""
    from minicpmo_cli.processing.audio import get_audio_placeholder

    prompts, images, audios, _ = processor.render_prompts(msgs, omni_input, use_tts_template)
    longest = 0
    for text, sample_images, sample_audios in zip(prompts, images, audios):
        placeholders = [get_audio_placeholder(len(a), chunk_input=chunk_input,
                                              chunk_length=processor.audio_chunk_length) for a in sample_audios]
        sizes = [_image_size(image) for image in sample_images]
        expanded = processor._expand_placeholders(text, sizes, placeholders, max_slice_nums, use_image_id)
        longest = max(longest, len(processor.tokenizer.encode(expanded, verbose=False)))  # no "too long" warning
    return longest


def check_prompt_fits(engine, msgs, answer_tokens: int | None = None, **processing: Any) -> int:
    """Raise PromptTooLong unless the prompt of `msgs` leaves room for an answer; returns its size in tokens.

    ``answer_tokens``: the answer's token limit when the caller chose one (max_new_tokens): the prompt and
    that many tokens must fit the context together (as OpenAI's API requires). ``processing``: the
    processor options the call will use (omni_input, use_tts_template, max_slice_nums, ...).
    """
    limit = context_limit(engine.model.config)
    answer = max(answer_tokens or 0, MIN_ANSWER_TOKENS)
    if answer >= limit:
        raise PromptTooLong(f"max_new_tokens is {answer}, but the model's context holds {limit} tokens, the "
                            "prompt included: ask for fewer", parameters=("max_new_tokens",))
    # Cheap bound first: a token covers at least one byte of text, so short text needs no tokenizing.
    room = limit - answer + MIN_ANSWER_TOKENS
    if _text_bytes(msgs) > room // 4 or room < 1024 or _has_media(msgs):
        size = prompt_token_count(engine.processor, msgs, **_known(processing))
        fail_if_too_long(size, limit, answer_tokens=answer)
        return size
    return 0


def fail_if_too_long(size: int, limit: int, what: str = "the prompt", answer_tokens: int = MIN_ANSWER_TOKENS) -> None:
    if size + answer_tokens <= limit:
        return
    if answer_tokens > MIN_ANSWER_TOKENS:
        raise PromptTooLong(f"{what} is {size} tokens and max_new_tokens asks for {answer_tokens} more, but the "
                            f"model reads at most {limit} (its context, max_position_embeddings): ask for fewer "
                            "new tokens, or shorten the prompt", parameters=("max_new_tokens",))
    raise PromptTooLong(f"{what} is {size} tokens, but the model reads at most {limit} "
                        f"(its context, max_position_embeddings, less {MIN_ANSWER_TOKENS} for the answer): "
                        "shorten the text, or give fewer or smaller images, or shorter audio or video")


def check_instruction(text: str | None) -> None:
    if text is not None and len(text) > MAX_INSTRUCTION_CHARS:
        raise PromptTooLong(f"--prompt is {len(text)} characters; an instruction may have at most "
                            f"{MAX_INSTRUCTION_CHARS}")


def audio_tokens(seconds: float) -> int:
    """Tokens that `seconds` of audio take in a prompt (its embeddings and the two markers around them)."""
    from minicpmo_cli.processing.audio import audio_token_count

    samples = int(math.ceil(max(seconds, 0.0) * INPUT_SAMPLE_RATE))
    return audio_token_count(samples) + 2  # <|audio_start|> ... <|audio_end|>


def unit_tokens(processor, width: int, height: int, max_slice_nums: int = 1) -> int:
    """Tokens of one omni unit: "<unit>", one frame of this size and 1 s of audio."""
    from minicpmo_cli.processing.audio import get_audio_placeholder

    image = processor.image_processor.get_slice_image_placeholder((width, height), 0, max_slice_nums, False)
    audio = get_audio_placeholder(INPUT_SAMPLE_RATE, chunk_input=True, chunk_length=processor.audio_chunk_length)
    return len(processor.tokenizer.encode("<unit>" + image + audio))


def check_video_fits(engine, info, frames: int, with_audio: bool, unit_mode: bool) -> None:
    """Before a video is decoded: its frames (or omni units) and sound track, measured from the header."""
    processor = engine.processor
    limit = context_limit(engine.model.config)
    if unit_mode:
        units = max(1, math.ceil(info.duration))
        size = units * unit_tokens(processor, info.width or 448, info.height or 448)
        fail_if_too_long(size, limit, what=f"the video ({units} one-second units)")
        return
    image = processor.image_processor.get_slice_image_placeholder((info.width or 448, info.height or 448), 0, 2,
                                                                  False)
    size = frames * len(processor.tokenizer.encode(image))
    if with_audio and info.has_audio:
        size += audio_tokens(info.duration)
    fail_if_too_long(size, limit, what=f"the video ({frames} frames, {info.duration:.0f} s of sound)")


def _image_size(image) -> tuple[int, int]:
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    shape = getattr(image, "shape", (0, 0))  # an array image: [h, w, c]
    return int(shape[1]), int(shape[0])


def _text_bytes(msgs) -> int:
    total = 0
    for message in _flat(msgs):
        content = message.get("content", "")
        for item in [content] if isinstance(content, str) else content:
            if isinstance(item, str):
                total += len(item.encode("utf-8", "surrogatepass"))
    return total


def _has_media(msgs) -> bool:
    return any(not isinstance(item, str) for message in _flat(msgs)
               for item in ([message.get("content", "")] if isinstance(message.get("content", ""), str)
                            else message.get("content", [])))


def _flat(msgs) -> list[dict]:
    return [m for sample in msgs for m in sample] if msgs and isinstance(msgs[0], list) else list(msgs)


_KNOWN = ("omni_input", "use_tts_template", "max_slice_nums", "use_image_id", "chunk_input")


def _known(processing: dict) -> dict:
    return {key: value for key, value in processing.items() if key in _KNOWN}
