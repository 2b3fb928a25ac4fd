"""Jobs the worker runs for the routes: a chat answer (text pieces, or text + speech), with usage counts.

Each job gets a shallow copy of the engine whose processor counts the prompt's tokens; a request's ``seed``
travels in its DecodeOptions, so it gives the same answer as ``minicpmo --seed N chat`` would. Generated
tokens are counted as the language model's forward passes (one per new token, batch 1): the worker runs one
job at a time, so the hook sees only that job's passes.
"""

from __future__ import annotations

import dataclasses
from contextlib import closing, contextmanager
from typing import Any, Iterator

from minicpmo_cli.api.chat import Conversation, chat_settings, reply, reply_with_speech
from minicpmo_cli.api.engine import DecodeOptions


class _CountingProcessor:
    """The engine's processor, remembering the length of the last prompt it built."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor
        self.prompt_tokens = 0

    def apply_chat_template(self, *args, **kwargs):
        inputs = self._processor.apply_chat_template(*args, **kwargs)
        self.prompt_tokens = int(inputs["input_ids"].shape[-1])
        return inputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def request_engine(engine: Any) -> tuple[Any, _CountingProcessor]:
    counter = _CountingProcessor(engine.processor)
    return dataclasses.replace(engine, processor=counter), counter


@contextmanager
def counting_passes(engine: Any):
    """A list whose length is the number of LLM forward passes made inside the block."""
    passes: list[int] = []
    # lm_head runs once per new token (the decode core calls the layers directly, not llm.forward)
    handle = engine.model.llm.lm_head.register_forward_hook(lambda *args: passes.append(1))
    try:
        yield passes
    finally:
        handle.remove()


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


def text_answer(conversation: Conversation, decode: DecodeOptions, stops: list[str]):
    """A job yielding ("text", piece) items, then ("end", usage dict, finish_reason)."""

    def run(engine: Any, cancel) -> Iterator[tuple]:
        job_engine, counter = request_engine(engine)
        stop_filter, stopped, answer = StopFilter(stops), False, []
        stream = reply(job_engine, conversation, decode, stream=True)
        with counting_passes(engine) as passes, closing(stream) as pieces:
            for piece in pieces:
                text, stopped = stop_filter.feed(piece)
                if text:
                    answer.append(text)
                    yield ("text", text)
                if stopped or cancel.is_set():
                    break
        tail = "" if stopped else stop_filter.flush()
        if tail:
            answer.append(tail)
            yield ("text", tail)
        completion = len(passes)
        finish = "length" if not stopped and completion >= max_new_tokens(conversation, decode) else "stop"
        yield ("end", usage(counter.prompt_tokens, completion), finish)

    return run


def spoken_answer(conversation: Conversation, decode: DecodeOptions, stops: list[str]):
    """A job returning (text, 24 kHz float32 wav, sample rate, usage, finish_reason)."""

    def run(engine: Any, cancel) -> tuple:
        job_engine, counter = request_engine(engine)
        with counting_passes(engine) as passes:
            text, wav, rate = reply_with_speech(job_engine, conversation, decode)
        stop_filter = StopFilter(stops)
        kept, stopped = stop_filter.feed(text)
        kept += "" if stopped else stop_filter.flush()
        completion = len(passes)
        finish = "length" if not stopped and completion >= max_new_tokens(conversation, decode) else "stop"
        return kept, wav, rate, usage(counter.prompt_tokens, completion), finish

    return run


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
