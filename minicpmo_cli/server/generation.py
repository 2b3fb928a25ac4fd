"""Jobs the pool runs for the routes: a chat answer (text pieces, or text + speech), with usage counts.

Every job takes ``(engine, cancel)``: ``cancel`` is set when the client leaves, and the job stops at its next
token or speech frame. Each job reports its request's times to a metrics RequestTimer (first token, first
audio, the end with its token counts).

A request's ``seed`` travels in its DecodeOptions, so it gives the same answer as ``minicpmo --seed N chat``
would. Token counts come from the generation itself (a ``Usage`` the job owns and generate fills): nothing
per request is attached to the shared model, so jobs do not depend on running one at a time to count right.
"""

from __future__ import annotations

import dataclasses
from contextlib import closing
from typing import Any, Iterator

from minicpmo_cli.api.chat import Conversation, chat_settings, reply, reply_with_speaker
from minicpmo_cli.api.engine import DecodeOptions
from minicpmo_cli.generation.usage import Usage


def count_tokens(engine: Any, text: str) -> int:
    return len(engine.processor.tokenizer.encode(text, add_special_tokens=False)) if text else 0


def with_default_seed(decode: DecodeOptions, seed: int | None) -> DecodeOptions:
    """The request's options, seeded with the server's --seed when the request gives no seed of its own."""
    return decode if decode.seed is not None or seed is None else dataclasses.replace(decode, seed=seed)


def max_new_tokens(conversation: Conversation, decode: DecodeOptions) -> int:
    """The answer's token limit as the chat task resolves it (the request's, else the preset's)."""
    return chat_settings(conversation, decode).max_new_tokens


class StopFilter:
    """Cuts a stream of text at the first of the ``stop`` strings, even one split across pieces."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""  # text not yet passed on: it might be the start of a stop string
        self.keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to pass on, whether a stop string was reached)."""
        self.held += piece
        cuts = [self.held.find(s) for s in self.stops if s in self.held]
        if cuts:
            out, self.held = self.held[:min(cuts)], ""
            return out, True
        if not self.stops:
            out, self.held = self.held, ""
            return out, False
        split = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:split], self.held[split:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def text_answer(conversation: Conversation, decode: DecodeOptions, stops: list[str], timer: Any):
    """A job yielding ("text", piece) items, then ("end", usage dict, finish_reason)."""

    def run(engine: Any, cancel) -> Iterator[tuple]:
        counts, finish = Usage(), "abort"
        stop_filter, stopped = StopFilter(stops), False
        stream = reply(engine, conversation, decode, stream=True, usage=counts)
        try:
            with closing(stream) as pieces:
                for piece in pieces:
                    timer.first_token()
                    text, stopped = stop_filter.feed(piece)
                    if text:
                        yield ("text", text)
                    if stopped or cancel.is_set():
                        break
            if cancel.is_set():
                return
            tail = "" if stopped else stop_filter.flush()
            if tail:
                yield ("text", tail)
            finish = finish_reason(stopped, counts, conversation, decode)
            yield ("end", usage(counts.prompt_tokens, counts.completion_tokens), finish)
        finally:  # also when the pool closes this job because its client left
            timer.finish(finish, counts.prompt_tokens, counts.completion_tokens)

    return run


def _written_half(engine: Any, conversation: Conversation, decode: DecodeOptions, stops: list[str], timer: Any,
                  cancel=None):
    """(text cut at the stops, speaker state, usage dict, finish_reason, Usage) of a spoken answer; its decode
    stops when ``cancel`` is set (the client left)."""
    counts = Usage()
    text, spk = reply_with_speaker(engine, conversation, decode, usage=counts, cancel=cancel)
    if counts.completion_tokens:
        timer.first_token()  # the text is known only whole (its speaker state comes from the same pass)
    stop_filter = StopFilter(stops)
    kept, stopped = stop_filter.feed(text)
    kept += "" if stopped else stop_filter.flush()
    finish = finish_reason(stopped, counts, conversation, decode)
    return kept, spk, usage(counts.prompt_tokens, counts.completion_tokens), finish, counts


def spoken_answer(conversation: Conversation, decode: DecodeOptions, stops: list[str], timer: Any):
    """A job returning (text, 24 kHz float32 wav, sample rate, usage, finish_reason)."""
    from minicpmo_cli.api.speech import speak_answer
    from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

    def run(engine: Any, cancel) -> tuple:
        counts, finish = Usage(), "abort"
        try:
            text, spk, used, finish, counts = _written_half(engine, conversation, decode, stops, timer, cancel)
            if cancel.is_set():
                return "", None, OUTPUT_SAMPLE_RATE, used, "abort"
            wav = speak_answer(engine, spk, text, cancel=cancel, seed=decode.seed)
            timer.first_audio()
            return text, wav, OUTPUT_SAMPLE_RATE, used, finish
        finally:
            timer.finish(finish if not cancel.is_set() else "abort", counts.prompt_tokens, counts.completion_tokens)

    return run


def spoken_stream(conversation: Conversation, decode: DecodeOptions, stops: list[str], timer: Any):
    """A job yielding ("text", whole text), then ("audio", float32 24 kHz piece) as the speech is synthesised,
    then ("end", usage dict, finish_reason)."""
    from minicpmo_cli.api.speech import stream_answer_speech

    def run(engine: Any, cancel) -> Iterator[tuple]:
        counts, finish = Usage(), "abort"
        try:
            text, spk, used, finish_then, counts = _written_half(engine, conversation, decode, stops, timer,
                                                                 cancel)
            if cancel.is_set():
                return
            yield ("text", text)
            # the seed's own generator: what the global one, seeded by the written half, would draw
            with closing(stream_answer_speech(engine, spk, text, seed=decode.seed)) as pieces:
                for piece in pieces:
                    timer.first_audio()
                    yield ("audio", piece)
                    if cancel.is_set():
                        return
            finish = finish_then
            yield ("end", used, finish)
        finally:
            timer.finish(finish, counts.prompt_tokens, counts.completion_tokens)

    return run


def finish_reason(stopped: bool, counts: Usage, conversation: Conversation, decode: DecodeOptions) -> str:
    """OpenAI's finish_reason: "length" when the answer used its whole token budget without a stop."""
    limit = max_new_tokens(conversation, decode)
    return "length" if not stopped and counts.completion_tokens >= limit else "stop"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
