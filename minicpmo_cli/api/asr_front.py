"""The front of `asr` for one input: its job (record, pieces, texts), its decoding and its segmentation.

Decoding and segmentation run on the pipeline's threads (api/asr_pipeline.py); the job is handed to the model
stage (api/asr.py) with its pieces, or, for a long input, with its parts as they come (api/asr_stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minicpmo_cli.api.asr_pipeline import Streamed
from minicpmo_cli.api.asr_stream import is_long, stream_parts
from minicpmo_cli.errors import InputError
from minicpmo_cli.outputs import TranscriptRecord
from minicpmo_cli.processing.segments import Piece
from minicpmo_cli.units import INPUT_SAMPLE_RATE

# api/asr.py's types (it imports this module): the options, an input, a piece's answer
AsrOptions = AudioInput = PieceText = Any


@dataclass
class _Job:
    """An input on its way through: its record and the texts of its pieces as they arrive."""

    record: TranscriptRecord
    instruction: str = ""  # the prompt of its pieces (it depends on the input's language with auto)
    language: str | None = None  # spoken language, when given or detected
    pieces: list[Piece] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # the pieces' samples [start, end)
    texts: list[PieceText | None] = field(default_factory=list)
    told: int = 0  # pieces already handed to ``on_piece`` (in order)
    open: bool = False  # a streamed input whose last part has not come (api/asr_stream.py)
    handed: bool = False  # a streamed input: some part of it reached the model stage
    probed: bool = False  # a streamed input: its --language auto probe was offered
    held: list | None = None  # pieces waiting for the --language auto probe's answer (api/asr.py)

    @property
    def done(self) -> bool:
        return self.record.error is not None or (not self.open and all(t is not None for t in self.texts))


def _stream_job(item: AudioInput, options: AsrOptions, seconds: float | None) -> tuple[_Job, Streamed] | None:
    """A long input's job, and its decoding left to the front thread as a stream (api/asr_stream.py); None
    for an input decoded whole (its header says it is shorter than ``seconds``, or says nothing)."""
    if not is_long(item.source, seconds):
        return None
    language = None if options.language == "auto" else options.language
    parts = lambda vad: stream_parts(item.source, input_name(item.path), options, vad, _reason)  # noqa: E731
    return _Job(TranscriptRecord(path=item.path), options.instruction, language, open=True), Streamed(parts)


def _start_job(item: AudioInput, options: AsrOptions) -> tuple[_Job, np.ndarray | None]:
    """Decode one input (on a decoding thread): its job, pieces still unknown, and its samples."""
    from minicpmo_cli.media.audio import load_audio

    record = TranscriptRecord(path=item.path)
    language = None if options.language == "auto" else options.language
    try:
        samples = item.source if isinstance(item.source, np.ndarray) else load_audio(item.source, INPUT_SAMPLE_RATE)
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            raise InputError("no audio samples", input_name(item.path))
    except InputError as exc:
        record.error = _reason(exc)
        return _Job(record), None
    record.duration = round(len(samples) / INPUT_SAMPLE_RATE, 3)
    return _Job(record, options.instruction, language), samples


def _segment_group(group: list[tuple[_Job, np.ndarray | None]], options: AsrOptions, vad) -> None:
    """The pieces of every decoded input of ``group``, the VAD run over all of them at once (``vad()``: the
    stage's media.vad_batch.BatchVAD)."""
    from minicpmo_cli.processing.segments import fixed_pieces, vad_pieces

    decoded = [(job, samples) for job, samples in group if samples is not None]
    if options.vad and decoded:
        regions = vad().regions([samples for _, samples in decoded], options.vad_threshold, options.min_silence_ms)
        pad = options.piece_pad_ms / 1000
        pieces = [vad_pieces(samples, spans, INPUT_SAMPLE_RATE, options.max_piece_seconds, pad)
                  for (_, samples), spans in zip(decoded, regions)]
    else:
        pieces = [fixed_pieces(samples, INPUT_SAMPLE_RATE, options.max_piece_seconds) for _, samples in decoded]
    for (job, _), found in zip(decoded, pieces):
        job.pieces = found
        job.spans = [(p.start, p.end) for p in found]
        job.texts = [None] * len(found)


def _reason(exc: InputError) -> str:
    """The error without the path it starts with: records carry the path in their own field."""
    message = str(exc)
    prefix = f"{exc.path}: " if exc.path else ""
    return message[len(prefix):] if prefix and message.startswith(prefix) else message


def input_name(path: str) -> str:
    """How messages name an input ("-" is stdin)."""
    return "<stdin>" if path == "-" else path
