"""Limits of one chat request that follow from the loaded model's context, checked before any decoding or
tokenizing: ``max_tokens`` must fit the context (OpenAI answers 400 when it does not), the messages' text is
bounded by characters (a token covers far fewer than CHARS_PER_TOKEN of them, so a prompt over the bound
cannot fit, and a 20 MB prompt is refused without being tokenized), and audio may be as long as the
context holds. The exact check, prompt tokens + max_tokens, is the library's (processing/limits.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from minicpmo_cli.server.errors import APIError
from minicpmo_cli.server.fetch import FetchLimits

CHARS_PER_TOKEN = 16  # an upper bound for real text; the cheap bound allows this many per token of context


def context_of(engine: Any) -> int:
    from minicpmo_cli.processing.limits import DEFAULT_CONTEXT, context_limit

    known = getattr(engine, "context", None)  # api.Engine reads it from the config once
    if isinstance(known, int):
        return known
    config = getattr(getattr(engine, "model", None), "config", None)
    return context_limit(config) if config is not None else DEFAULT_CONTEXT


def audio_seconds_for(context: int) -> float:
    """Seconds of audio whose tokens fill ``context`` (longer audio cannot fit in one prompt)."""
    from minicpmo_cli.processing.limits import audio_tokens

    return context * 60.0 / audio_tokens(60.0)


def check_answer_tokens(tokens: int | None, param: str, engine: Any, context: int | None = None) -> None:
    """400 for an answer budget the context cannot hold even with an empty prompt."""
    context = context_of(engine) if context is None else context
    if tokens is not None and tokens >= context:
        raise APIError(400, f"{param} is {tokens}, but this model's context is {context} tokens, the prompt "
                            "included: ask for fewer", param=param, code="context_length_exceeded")


def chat_limits(body: Any, fetch: FetchLimits, engine: Any) -> FetchLimits:
    """400 for a request that cannot fit the context; else its media limits (audio: what the context holds)."""
    context = context_of(engine)
    check_answer_tokens(body.answer_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
                        engine, context)
    chars = body.text_chars()
    if chars > context * CHARS_PER_TOKEN:
        raise APIError(400, f"the messages hold {chars} characters of text, more than this model's context of "
                            f"{context} tokens can take (at most {context * CHARS_PER_TOKEN} characters)",
                       param="messages", code="context_length_exceeded")
    return dataclasses.replace(fetch, max_audio_seconds=audio_seconds_for(context))
