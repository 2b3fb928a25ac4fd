"""A streamed text answer read straight off a threaded LLM engine (generation/engine.py), in the caller's thread.

The plain path (generation/text.py ``_stream_text``) runs the decode on a thread of its own that hands each id
to a transformers ``TextIteratorStreamer``, whose queue the caller reads: two thread handoffs per token.
With a threaded engine the caller can read the request's :class:`Handle` itself, so here each wakeup takes
every id chosen since the last one (:meth:`Handle.batches`) and turns them into text at once, with the same
text rules as ``TextStreamer`` (:class:`PieceStreamer` is one): the pieces join up to the same text.
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import TextStreamer

from minicpmo_cli.generation.decode import split_rows
from minicpmo_cli.generation.requests import Request
from minicpmo_cli.generation.settings import DecodeSettings
from minicpmo_cli.generation.usage import Usage
from minicpmo_cli.processing.answer_text import terminator_ids
from minicpmo_cli.processing.tts_text import LLM_TERMINATORS


class PieceStreamer(TextStreamer):
    """transformers' ``TextStreamer`` whose printable text is collected (:meth:`take`), not printed."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.pieces.append(text)

    def take(self) -> str:
        text, self.pieces = "".join(self.pieces), []
        return text


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
    streamer = PieceStreamer(tokenizer)
    try:
        for ids in handle.batches():
            usage.completion_tokens += len(ids)
            streamer.put(torch.tensor(ids, dtype=torch.long))
            text = strip_terminators(streamer.take())
            if text:
                yield text
        if handle.error is not None:
            raise handle.error
        streamer.end()
        text = strip_terminators(streamer.take())
        if text:
            yield text
    finally:
        if not handle.done:
            llm_engine.abort(handle)
