"""The model stage of `asr`: the pieces found by the front stages -> their answers, in a bounded stream.

api/asr.py runs the front stages (decode, VAD: api/asr_pipeline.py) and makes the records; :class:`PieceRun`
takes the pieces as inputs are segmented, sends them to the model ``batch_size`` at a time (sorted by length
within a window: equal lengths share one Whisper call) and keeps up to :meth:`PieceRun.in_flight` pieces on
the LLM engine, so that a row that finishes is replaced by the next piece at once (api/asr_model_calls.py).
The language probes of --language auto ride the same stream, ahead of the pieces they hold back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from minicpmo_cli.api import asr_model_calls as calls
from minicpmo_cli.api.asr_model_calls import (  # noqa: F401 - re-exported
    ASR_TASK, PieceModel, PieceText, TranscriptionCancelled, embed_prompts, generate_batch, has_audio_tokens)
from minicpmo_cli.api.engine import DecodeOptions, Engine

SORT_WINDOW_BATCHES = 4  # pieces of up to this many batches are sorted by length before batching

# ------------------------------------------------------------------------------------------ batch sizes
# Pieces embedded per pass on the CPU: Whisper's per-position work is padded to the longest row, so more only
# adds padding there; the LLM rows decoded together are the engine's slots, whatever the batch.
CPU_BATCH_SIZE = 4
MAX_AUTO_BATCH_SIZE = 128
# GPU memory one 30 s piece may need, with margin: its KV cache (~800 prompt + 512 new positions x 28 layers
# x 4 KV heads x 128 x (key, value) x 2 bytes = 56 KiB a position, ~75 MiB), the prefill activations of
# ~800 positions (~60 MiB in the 18,944-wide MLP) and its Whisper pass (16 heads x 1500^2 attention scores).
PIECE_BYTES = 256 * 2**20
FREE_MEMORY_SHARE = 0.8  # leave the rest to the allocator's fragmentation and other processes


def default_batch_size(device_type: str, free_bytes: int | None) -> int:
    """Pieces per pass when --batch-size is not given: CPU_BATCH_SIZE on the CPU, else from free GPU memory.

    ``free_bytes`` is what the GPU has free with the model loaded; the batch takes FREE_MEMORY_SHARE of it
    at PIECE_BYTES a piece, between 1 and MAX_AUTO_BATCH_SIZE.
    """
    if device_type != "cuda" or free_bytes is None:
        return CPU_BATCH_SIZE
    return max(1, min(MAX_AUTO_BATCH_SIZE, int(free_bytes * FREE_MEMORY_SHARE) // PIECE_BYTES))


def engine_batch_size(engine: Engine) -> int:
    """:func:`default_batch_size` for the engine's device (asks CUDA how much memory is free)."""
    import torch

    device = torch.device(engine.device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return default_batch_size(device.type, free)


def loaded_once(engine: Engine | Callable[[], Engine]) -> Callable[[], Engine]:
    """``engine``, or a function that loads it the first time it is called and returns it after."""
    loaded: list[Engine] = [] if callable(engine) else [engine]  # an Engine, or any api.protocol.Engine

    def model() -> Engine:
        if not loaded:
            loaded.append(engine())
        return loaded[0]
    return model


@dataclass
class _Piece:
    """A piece on its way: its job (api/asr.py _Job), index and samples; ``instruction`` None: the job's
    (read when the piece is sent); ``on_answer`` None: the answer is the piece's text."""

    job: Any
    index: int
    clip: np.ndarray
    instruction: str | None = None
    on_answer: Callable[[Any, PieceText], None] | None = None


class PieceRun:
    """The pieces of a transcribe_many run between the VAD and the records: the inputs still open (in input
    order), the probes and pieces not yet sent, those on the model, the batch size (found once the model is
    loaded) and the progress counts."""

    def __init__(self, model: Callable[[], Engine], batch_size: int | None, decode: DecodeOptions,
                 finish: Callable[[Any], Any], tell: Callable[[Any], None] | None,
                 progress: Callable[[int, int], None] | None, cancel: Any = None) -> None:
        self.model, self.decode, self.finish, self.tell = model, decode, finish, tell
        self.progress, self.cancel = progress, cancel
        self.open_jobs: deque = deque()  # api/asr.py _Job: .done, .texts, .instruction
        self.probes: list[_Piece] = []  # sent before any waiting piece
        self.waiting: list[_Piece] = []  # pieces gathering into a sort window
        self.ready: list[_Piece] = []  # sorted windows, sent as the model has room
        self.flying: deque[tuple[_Piece, calls.Pending]] = deque()  # on the model, oldest first
        self.sizes: list[int] = [] if batch_size is None else [batch_size]
        self.counts = [0, 0]  # pieces done, pieces known: for ``progress``
        self._model: PieceModel | None = None

    # ----- what the run is given
    def add(self, job, pieces: list[tuple[int, np.ndarray]]) -> None:
        """Pieces to answer with the job's instruction (as it is when they are sent)."""
        self.waiting.extend(_Piece(job, index, clip) for index, clip in pieces)

    def probe(self, job, clip: np.ndarray, instruction: str, decide: Callable[[Any, PieceText], None],
              rest: list[tuple[int, np.ndarray]]) -> None:
        """Send ``clip`` with ``instruction`` first; its answer goes to ``decide(job, answer)``, and only then
        are the pieces of ``rest`` still unanswered added (with the instruction ``decide`` chose)."""
        def answered(job_, answer: PieceText) -> None:
            decide(job_, answer)
            self.add(job_, [(index, clip_) for index, clip_ in rest if job_.texts[index] is None])
        self.probes.append(_Piece(job, 0, clip, instruction, answered))

    def advance(self, done: int = 0, found: int = 0) -> None:
        self.counts[:] = self.counts[0] + done, self.counts[1] + found
        if self.progress is not None:
            self.progress(*self.counts)

    # ----- sizes
    def piece_model(self) -> PieceModel:
        if self._model is None:
            self._model = PieceModel(self.model(), self.decode)
        return self._model

    def batch_size(self) -> int:
        if not self.sizes:
            self.sizes.append(engine_batch_size(self.model()))
        return self.sizes[0]

    def window(self) -> int:  # one batch at a time when batches are single pieces: sorting would gain nothing
        return self.batch_size() * (SORT_WINDOW_BATCHES if self.batch_size() > 1 else 1)

    def in_flight(self) -> int:
        """Pieces on the model at most: every slot of the LLM engine busy, and the next batch queued so that a
        slot that frees is refilled at once."""
        model = self._model  # (not loaded for this: a run of slivers alone never loads it)
        slots = getattr(getattr(model.engine, "llm_engine", None), "max_batch", 0) if model is not None else 0
        return self.batch_size() + max(self.batch_size(), slots or 0)

    # ----- the stream
    def pump(self, final: bool = False) -> Iterator[Any]:
        """Send what is ready (probes first; other pieces once a sort window is full, or at the end), take in
        the answers that came, yield the records that are complete. Blocks only while the model is full and
        more than a window waits (bounding memory), and when ``final``, until all is answered; a block ends at
        the first answer, whichever piece it is, so the next batch goes out at once."""
        while True:
            yield from self._take_answers()
            if self._ready(final) and len(self.flying) < self.in_flight():
                self._send_batch()
                continue
            if not self.flying or not (final or self._backlog()):
                return
            self._wait_any()

    def _wait_any(self) -> None:
        oldest = self.flying[0][1]
        while not any(pending.done for _, pending in self.flying):
            if self.cancel is not None and self.cancel.is_set():
                raise TranscriptionCancelled("the transcription was cancelled")
            oldest.wait_briefly()

    def _backlog(self) -> bool:
        """More waits than a window and a batch: the caller waits for the model before taking more inputs."""
        waiting = len(self.waiting) + len(self.ready) + len(self.probes)
        return waiting > 0 and waiting >= self.window() + self.batch_size()

    def _ready(self, final: bool) -> bool:
        if self.waiting and (final or len(self.waiting) >= self.window()):
            self.waiting.sort(key=lambda piece: len(piece.clip))  # stable: equal lengths keep input order
            self.ready += self.waiting
            self.waiting = []
        return bool(self.probes or self.ready)

    def _send_batch(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise TranscriptionCancelled("the transcription was cancelled")
        if self.probes:
            self.probes.sort(key=lambda piece: len(piece.clip))
        queue = self.probes if self.probes else self.ready
        batch, queue[:] = queue[:self.batch_size()], queue[self.batch_size():]
        for piece in batch:
            if not has_audio_tokens(piece.clip):  # a sliver without a single audio embedding: ""
                self._answer(piece, PieceText(""))
        todo = [piece for piece in batch if piece.on_answer is not None or piece.job.texts[piece.index] is None]
        todo = [piece for piece in todo if has_audio_tokens(piece.clip)]
        if todo:
            instructions = [piece.instruction or piece.job.instruction for piece in todo]
            pending = calls.start_batch(self.piece_model(), [piece.clip for piece in todo], instructions)
            self.flying.extend(zip(todo, pending))

    def _take_answers(self) -> Iterator[Any]:
        """Every answer that came, in any order (a long piece does not hold back the rows after it; answers do
        not depend on which pieces share the engine's steps), each record yielded as soon as it is complete."""
        done = [entry for entry in self.flying if entry[1].done]
        for entry in done:
            self.flying.remove(entry)
            self._answer(entry[0], entry[1].wait())
            yield from self.finished()
        if not done:
            yield from self.finished()

    def _answer(self, piece: _Piece, answer: PieceText) -> None:
        if piece.on_answer is not None:
            piece.on_answer(piece.job, answer)
            if piece.job.texts[piece.index] is not None:
                self.advance(done=1)
        else:
            piece.job.texts[piece.index] = answer
            self.advance(done=1)

    def finished(self) -> Iterator[Any]:
        if self.tell is not None:
            for job in self.open_jobs:
                self.tell(job)
        while self.open_jobs and self.open_jobs[0].done:
            yield self.finish(self.open_jobs.popleft())

    def close(self) -> None:
        """Abort what is still on the model (the caller stopped reading, failed or cancelled)."""
        while self.flying:
            self.flying.popleft()[1].abort()
