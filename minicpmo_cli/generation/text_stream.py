"""A streamed text answer read straight off a threaded LLM engine (generation/engine.py), in the caller's thread.

The plain path (generation/text.py ``_stream_text``) runs the decode on a thread of its own that hands each id
to a transformers ``TextIteratorStreamer``, whose queue the caller reads: two thread handoffs per token.
With a threaded engine the caller can read the request's :class:`Handle` itself, so here each wakeup takes
every id chosen since the last one (:meth:`Handle.batches`) and turns them into text at once
(:class:`IncrementalText`): the pieces join up to the same text.
"""

from __future__ import annotations

from typing import Iterator

import torch
from minicpmo_cli.generation.decode import split_rows
from minicpmo_cli.generation.requests import Request
from minicpmo_cli.generation.settings import DecodeSettings
from minicpmo_cli.generation.usage import Usage
from minicpmo_cli.processing.answer_text import terminator_ids
from minicpmo_cli.processing.tts_text import LLM_TERMINATORS


class IncrementalText:
    """Ids -> text as they come, decoding only a few ids per batch (vLLM's incremental detokenizer): the text
    of ``ids[prefix:]`` minus that of ``ids[prefix:read]`` is what the new ids add; held back while it ends in
    an incomplete character. The pieces join up to ``decode(all ids)`` (a streamer that decodes everything
    since the last newline at every id costs O(n) per id on a long line)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        # transformers' decode of a fast tokenizer is the Rust decode plus (when asked) a clean-up of spaces;
        # without the clean-up, the Rust decode itself (a tenth of the time: it runs twice per batch of ids)
        rust = getattr(tokenizer, "_tokenizer", None)
        plain = rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._rust = rust if plain and hasattr(rust, "decode") else None

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def strip_terminators(text: str) -> str:
    for term in LLM_TERMINATORS:
        text = text.replace(term, "")
    return text


def stream_on_engine(llm_engine, embeds: torch.Tensor, tokenizer, decode: DecodeSettings, usage: Usage,
                     seed: int | None = None) -> Iterator[str]:
    """Text pieces of one prompt row (``embeds`` ``[1, L, D]``) decoded on the threaded ``llm_engine``; every id
    counts in ``usage.completion_tokens`` as it comes. Closing the iterator aborts the request (its slot is
    freed at the engine's next step). Nothing is submitted before the first piece is asked for."""
    settings = decode.with_(stop_ids=tuple(terminator_ids(tokenizer)))
    handle = llm_engine.submit(Request(split_rows(embeds, None)[0], settings, seed=seed, stream=True))
    text = IncrementalText(tokenizer)
    try:
        for ids in handle.batches():
            usage.completion_tokens += len(ids)
            piece = strip_terminators(text.add(ids))
            if piece:
                yield piece
        if handle.error is not None:
            raise handle.error
        piece = strip_terminators(text.flush())
        if piece:
            yield piece
    finally:
        if not handle.done:
            llm_engine.abort(handle)
