"""What the TTS engine (generation/tts_engine.py) is asked for and what its callers wait on.

A :class:`TTSRequest` is one utterance: a speaker state and its text pieces (each one that fits the 300
reserved text slots), spoken one after the other in one engine slot, each drawing from its own sampler (the
pieces of one utterance may wrap one random stream: they run in order, so its draws follow each other as in
the one-at-a-time loop). :meth:`TTSEngine.submit` returns a :class:`TTSHandle`: the codes of each piece as
it is done, then the reason the request finished.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from minicpmo_cli.model.tts import DEFAULT_TEMPERATURES
from minicpmo_cli.units import MAX_AUDIO_FRAMES


@dataclass
class TTSPiece:
    """One text that fits the TTS's reserved slots, and the sampler its frames are drawn with
    (``sample(probs [rows, n]) -> [rows, 1]``; with ``snapshot`` / ``restore`` the end of speech is read
    every few frames instead of every frame)."""

    text: str
    sampler: Any


@dataclass
class TTSRequest:
    """One utterance: ``pieces`` spoken in order with the speaker state ``spk_embeds`` (``[1, llm_dim]``).
    ``max_new_tokens``: the frame cap of each piece (checked after the text is all in, as the one-at-a-time
    loop does). ``cancel``: an object with ``is_set()`` (a threading.Event): once set, the engine aborts the
    request at its next step. ``on_finish(handle)``: called once it finished (on the engine's thread)."""

    spk_embeds: torch.Tensor
    pieces: list[TTSPiece]
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES
    max_new_tokens: int = MAX_AUDIO_FRAMES
    cancel: Any = None
    on_finish: Callable[[TTSHandle], None] | None = None


class TextFeed:
    """Text pieces handed to a streamed request while it is spoken (e.g. an answer's text as it is written):
    :meth:`put` each piece, :meth:`close` once the text is complete. Iterated by the request's schedule on the
    engine's thread: a piece, None while nothing is there yet (the row waits in its slot, skipped by the
    steps, until the next :meth:`put` or :meth:`close` wakes the engine), and the end once closed."""

    def __init__(self, pieces: Sequence[str] = ()) -> None:
        self._pieces: deque[str] = deque(pieces)
        self._closed = False
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None

    def put(self, text: str) -> None:
        with self._lock:
            if self._closed:
                raise ValueError("the text feed is closed")
            self._pieces.append(str(text))
        self._notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._notify()

    @property
    def ready(self) -> bool:
        """Whether the schedule can go on: a piece is there or the text is complete."""
        with self._lock:
            return bool(self._pieces) or self._closed

    def bind(self, wake: Callable[[], None]) -> None:
        """``wake()`` is called at each put and close (the engine's; it steps rows whose text came)."""
        self._wake = wake

    def __iter__(self) -> Iterator[str | None]:
        while True:
            with self._lock:
                if self._pieces:
                    piece = self._pieces.popleft()
                elif self._closed:
                    return
                else:
                    piece = None
            yield piece

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake()


@dataclass
class TTSStreamRequest:
    """One utterance on the streaming schedule (generation/speech.py ``StreamSegment``): ``text_pieces`` (a
    list, or a :class:`TextFeed` filled while the request runs) consumed in order as the schedule asks for them, segments re-primed at sentence ends, all frames drawn
    with ``sampler``. Its handle yields :class:`SegmentStart`, :class:`FramesKept` and :class:`SegmentEnd`
    events as the frames settle (the caller decodes the audio: generation/speech.py ``StreamDecoder``).
    ``max_new_tokens``, ``cancel``, ``on_finish``: as :class:`TTSRequest`."""

    spk_embeds: torch.Tensor
    text_pieces: list[str] | TextFeed
    sampler: Any
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES
    max_new_tokens: int = MAX_AUDIO_FRAMES
    cancel: Any = None
    on_finish: Callable[[TTSHandle], None] | None = None


@dataclass
class SegmentStart:
    """A streamed segment begins: ``primer_frames`` of its ids were spoken by the segment before;
    ``text_offset``: where its chunks' text starts in its text."""

    primer_frames: int
    text_offset: int


@dataclass
class FramesKept:
    """The segment's frames kept so far (``[1, n, num_vq]``, primer included) and its text while they were
    drawn."""

    new_ids: torch.Tensor
    text: str


@dataclass
class SegmentEnd:
    """The segment is over: its final frames (an end of speech may drop one, as the reference does)."""

    new_ids: torch.Tensor
    text: str


@dataclass
class TTSStats:
    """Counters of one engine: steps run, frames drawn (kept or not), those whose probabilities were made
    together with other rows', the most rows decoded in one step, requests finished; in a snapshot
    (``TTSEngine.snapshot``) also the rows running and waiting, the pool's slots and its bytes."""

    steps: int = 0
    frames: int = 0
    frames_together: int = 0
    peak_rows: int = 0
    finished: int = 0
    running: int = 0
    waiting: int = 0
    slots_total: int = 0
    pool_bytes: int = 0


class TTSHandle:
    """A submitted request: ``codes`` (one ``[1, T, num_vq]`` tensor per piece done so far; a streamed
    request's events instead, see :class:`TTSStreamRequest`), ``reason``
    (``stop``: every piece ended; ``abort``; ``error``) once finished, ``error`` when a step failed."""

    def __init__(self, engine, request: TTSRequest, prompts: list) -> None:
        self.engine, self.request = engine, request
        self.prompts = prompts  # per piece: (input ids [1, L], text mask) on the TTS's device
        self.codes: list[torch.Tensor] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self._changed = threading.Condition()

    @property
    def done(self) -> bool:
        return self.reason is not None

    def abort(self) -> None:
        """Stop this request (its slot is freed at the engine's next step); the codes made so far stay."""
        self.engine.abort(self)

    def pieces(self) -> Iterator[torch.Tensor]:
        """Each piece's codes as soon as it is done (an aborted piece: the frames kept so far); raises the
        engine's error if a step failed. Without an engine thread the caller steps the engine."""
        index = 0
        while True:
            with self._changed:
                if self.engine.threaded:
                    self._changed.wait_for(lambda: len(self.codes) > index or self.done)
                ready = self.codes[index] if len(self.codes) > index else None
                finished = self.done
            if ready is not None:
                index += 1
                yield ready
            elif finished:
                if self.error is not None:
                    raise self.error
                return
            else:
                self.engine.step()

    def result(self) -> list[torch.Tensor]:
        """Every piece's codes once the request finished."""
        return list(self.pieces())

    # ----- the engine's side --------------------------------------------------------------------------

    def _piece(self, codes: torch.Tensor) -> None:
        with self._changed:
            self.codes.append(codes)
            self._changed.notify_all()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._changed:
            if self.done:
                return
            self.reason, self.error = reason, error
            self._changed.notify_all()
        if self.request.on_finish is not None:
            self.request.on_finish(self)

