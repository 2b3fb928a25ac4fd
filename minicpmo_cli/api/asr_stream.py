"""Long inputs in the asr pipeline: decoded, segmented and handed to the model stage as a stream of parts.

An input whose header says it is longer than ``Stages.stream_seconds`` is not decoded whole: the front thread
decodes it chunk by chunk (media/audio_stream.py), runs the VAD over the stream (media/vad_blocks.py) and hands
on its pieces as they are found (processing/segments_stream.py), a few parts ahead of the model at most
(api/asr_pipeline.py). The pieces, their samples, the cues, and so the record, are those of the whole-file path;
memory is a window of the audio instead of all of it. Shorter inputs keep the whole-file path (one VAD call
over many files is faster than a stream per file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from minicpmo_cli.api.asr_pipeline import Part
from minicpmo_cli.errors import InputError
from minicpmo_cli.processing.segments import Piece, Span
from minicpmo_cli.units import INPUT_SAMPLE_RATE

BYTES_PER_SECOND_FLOOR = 500  # 4 kbit/s: a file smaller than seconds x this cannot last that long


def is_long(source: Any, seconds: float | None) -> bool:
    """True when ``source`` (a path or the bytes of a file) states a duration over ``seconds``."""
    if seconds is None or isinstance(source, np.ndarray):
        return False
    try:
        size = len(source) if isinstance(source, (bytes, bytearray, memoryview)) else os.path.getsize(source)
    except (OSError, TypeError):
        return False  # the decoder words the problem
    if size < seconds * BYTES_PER_SECOND_FLOOR:
        return False
    from minicpmo_cli.media.audio import header_seconds

    try:
        stated = header_seconds(source)
    except InputError:
        return False
    return stated is not None and stated > seconds


@dataclass
class StreamPart(Part):
    """Pieces of a streamed input found since the last part, with their samples (read as ``part[start:end]``
    like the samples of a whole input); the last part has the input's length, or its error."""

    pieces: list[tuple[Piece, np.ndarray]] = field(default_factory=list)
    last: bool = False
    total: int = 0
    error: str | None = None

    @property
    def empty(self) -> bool:
        return not self.pieces and not self.last

    def __getitem__(self, span: slice) -> np.ndarray:
        for piece, clip in self.pieces:
            if (piece.start, piece.end) == (span.start, span.stop):
                return clip
        raise KeyError(f"no piece {span.start}-{span.stop} in this part")


def stream_parts(source: Any, name: str, options: Any, vad: Callable[[], Any],
                 reason: Callable[[InputError], str]) -> Iterator[StreamPart]:
    """The parts of one long input (``options``: api.asr.AsrOptions; ``vad()``: the front's BatchVAD); a
    problem with the input ends it with a part that carries the error, as a whole decode would report it."""
    from minicpmo_cli.media.audio_stream import stream_audio
    from minicpmo_cli.media.vad_blocks import VadStream
    from minicpmo_cli.processing.segments_stream import PieceStream

    try:
        detector = VadStream(vad(), options.vad_threshold, options.min_silence_ms) if options.vad else None
        pieces = PieceStream(detector, options.max_piece_seconds, options.piece_pad_ms / 1000)
        for chunk in stream_audio(source, INPUT_SAMPLE_RATE):
            yield StreamPart(pieces.feed(chunk))  # empty ones too: the front thread looks whether to stop
        found = pieces.finish()
        if pieces.total == 0:
            raise InputError("no audio samples", name)
        yield StreamPart(found, last=True, total=pieces.total)
    except InputError as exc:
        yield StreamPart(last=True, error=reason(exc))


@dataclass(frozen=True)
class Handed:
    """What one entry of a group brings to the model stage: whether its input is new there, whether its
    --language auto probe is due now, and its new pieces as (index in the input, span)."""

    first: bool
    probe: bool
    spans: list[tuple[int, Span]]


def hand_on(job: Any, samples: Any) -> Handed:
    """Take one entry (api.asr._Job, its samples or a StreamPart) on the model stage's thread: a streamed
    input's pieces are added to its job here, so the job is only ever changed on that thread."""
    if not isinstance(samples, StreamPart):
        return Handed(True, bool(job.spans), list(enumerate(job.spans)))
    first, job.handed = not job.handed, True
    start = len(job.spans)
    job.pieces += [piece for piece, _ in samples.pieces]
    job.spans += [(piece.start, piece.end) for piece, _ in samples.pieces]
    job.texts += [None] * len(samples.pieces)
    if samples.error is not None:
        job.record.error, job.open = samples.error, False
    elif samples.last:
        job.record.duration, job.open = round(samples.total / INPUT_SAMPLE_RATE, 3), False
    probe = bool(job.spans) and not job.probed
    job.probed = job.probed or probe
    return Handed(first, probe, [(index, job.spans[index]) for index in range(start, len(job.spans))])
