"""Audio decoded as a stream: 16 kHz mono float32 chunks whose concatenation is ``load_audio`` bit for bit.

A multi-hour file decoded whole holds all its samples at once (2 h at 16 kHz: 460 MB of float32, more at its
native rate and channels before the mix). Here libsndfile's blocks or PyAV's frames are mixed to mono and
resampled one at a time, soxr's stream carrying the filter state across chunks (its output is the one-shot
resampler's, bit for bit), so memory stays a few blocks whatever the length. The decoders, the channel mix
and the resampler are media/audio.py's, in the same order: the samples are the ones ``load_audio`` returns.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Iterator

import numpy as np

from minicpmo_cli.errors import InputError
from minicpmo_cli.media import MediaSource, check_bytes, check_readable_file, read_head, source_name
from minicpmo_cli.media.audio import (
    _SOUNDFILE_MAGIC, RESAMPLE_QUALITY, _no_audio_message, _packets, _short, _undecodable_message)
from minicpmo_cli.units import INPUT_SAMPLE_RATE

BLOCK_FRAMES = 1 << 16  # native frames per libsndfile read


def stream_audio(source: MediaSource, sr: int = INPUT_SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Mono float32 chunks at ``sr`` Hz of a file path (or the bytes of a file); InputError as load_audio
    raises it (a problem found after some chunks were handed out is raised then)."""
    name = source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = check_bytes(source)
        open_source = lambda: io.BytesIO(data)  # noqa: E731 - opened again for the second decoder
    else:
        path = check_readable_file(source)
        open_source = lambda: os.fspath(path)  # noqa: E731
    head = read_head(source)
    if head.startswith(_SOUNDFILE_MAGIC):
        rate_and_blocks = _soundfile_blocks(open_source(), name)
        if rate_and_blocks is not None:
            yield from _resampled(*rate_and_blocks, sr)
            return
    yield from _resampled(*_av_blocks(open_source(), name, head), sr)


def _mono(channels: np.ndarray) -> np.ndarray:
    """[C, n] -> [n]: the plain mean, as load_audio mixes."""
    return channels.mean(axis=0) if channels.shape[0] > 1 else channels[0]


def _resampled(rate: int, blocks: Iterator[np.ndarray], sr: int) -> Iterator[np.ndarray]:
    """Each [C, n] block mixed to mono and resampled to ``sr`` (soxr's stream: the one-shot result)."""
    if rate == sr:
        for block in blocks:
            yield np.ascontiguousarray(_mono(block), dtype=np.float32)
        return
    import soxr

    stream = soxr.ResampleStream(rate, sr, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    for block in blocks:
        out = stream.resample_chunk(np.ascontiguousarray(_mono(block), dtype=np.float32))
        if len(out):
            yield out
    out = stream.resample_chunk(np.zeros(0, np.float32), last=True)
    if len(out):
        yield out


def _soundfile_blocks(file, name: str) -> tuple[int, Iterator[np.ndarray]] | None:
    """(rate, blocks [C, n]) from libsndfile, or None when it cannot read this input or finds no samples
    (PyAV decides then, as load_audio does)."""
    import soundfile

    try:
        sound = soundfile.SoundFile(file)
        first = sound.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
    except Exception:  # libsndfile raises several types for "not mine"
        return None
    if first.shape[0] == 0:
        sound.close()
        return None

    def blocks() -> Iterator[np.ndarray]:
        with sound:
            block = first
            while block.shape[0]:
                yield np.ascontiguousarray(block.T)
                try:
                    block = sound.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                except Exception as exc:  # noqa: BLE001 - libsndfile's types; the file broke off past its start
                    raise InputError(f"corrupt audio data ({exc})", name) from None
    return int(sound.samplerate), blocks()


def _av_blocks(file, name: str, head: bytes) -> tuple[int, Iterator[np.ndarray]]:
    """(rate, blocks [C, n]) of the first audio stream, decoded by PyAV packet by packet."""
    import av

    try:
        container = av.open(file, mode="r")
    except av.error.FFmpegError as exc:
        raise InputError(_undecodable_message(head, exc), name) from None
    if not container.streams.audio:
        container.close()
        raise InputError(_no_audio_message(container, head), name)
    blocks = _av_decode(container, container.streams.audio[0], name)
    first = next(blocks, None)  # the rate of the frames, as load_audio takes it
    if first is None:
        raise InputError("no audio samples could be decoded (corrupt or truncated file?)", name)
    return first[0], _chain(first[1], (block for _, block in blocks))


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _av_decode(container, stream, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """(frame rate, planar float block) of every frame; damaged packets skipped and counted, as load_audio."""
    import av

    converter = av.AudioResampler(format="fltp")  # the sample format only: soxr changes the rate
    damaged = 0
    rate = stream.codec_context.sample_rate or stream.rate
    with container:
        try:
            for packet in _packets(container, stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    damaged += 1
                    continue
                for frame in frames:
                    rate = frame.sample_rate
                    for converted in converter.resample(frame):
                        block = converted.to_ndarray().astype(np.float32, copy=False)
                        if block.shape[-1] > 0:
                            yield int(rate), block
            for converted in converter.resample(None):
                block = converted.to_ndarray().astype(np.float32, copy=False)
                if block.shape[-1] > 0:
                    yield int(rate), block
        except av.error.FFmpegError as exc:
            raise InputError(f"corrupt audio data ({_short(exc)})", name) from None
    if damaged:
        logging.getLogger(__name__).warning("%s: %d damaged audio packet(s) skipped (corrupt or truncated file?)",
                                            name, damaged)
