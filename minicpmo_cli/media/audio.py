"""Audio decoding: any common audio file (or the audio track of a video) -> 16 kHz mono float32 samples.

soundfile (libsndfile) decodes wav/flac/ogg/aiff quickly; everything else (mp3, m4a/aac, opus in odd
containers, mp4/mkv/webm audio tracks) goes through PyAV (FFmpeg), which reports problems to us instead of
printing them on stderr as mpg123 does inside libsndfile. Resampling uses soxr at "HQ" quality and the
channel mix is a plain mean: that is what `librosa.load(path, sr=16000, mono=True)` does, which is how the
model's guide loads audio, so the samples we feed the model match theirs.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Union

import numpy as np

from minicpmo_cli.errors import InputError
from minicpmo_cli.media import (
    MediaSource,
    check_bytes,
    check_readable_file,
    guess_kind,
    read_head,
    source_name,
)
from minicpmo_cli.units import INPUT_SAMPLE_RATE

RESAMPLE_QUALITY = "HQ"  # soxr quality; librosa's default res_type "soxr_hq"

Samples = np.ndarray  # float32, shape [n], values in about [-1, 1]


class AudioTooLong(InputError):
    """The audio is longer than the caller's ``max_seconds``."""


def load_audio(source: MediaSource, sr: int = INPUT_SAMPLE_RATE, max_seconds: float | None = None) -> Samples:
    """Decode a file path (or the raw bytes of a file) to mono float32 samples at `sr` Hz.

    Raises InputError naming the file for: missing, directory, unreadable, empty, not audio,
    corrupt, or a video without an audio track. With ``max_seconds``, audio longer than that is refused
    (AudioTooLong) from its header's duration before decoding, and while decoding when the header does not
    say (or lies): memory stays bounded by the limit, whatever the file claims.
    """
    name = source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = check_bytes(source)
        channels, native_rate = _decode(lambda: io.BytesIO(data), name, source, max_seconds)
    else:
        path = check_readable_file(source)
        channels, native_rate = _decode(lambda: os.fspath(path), name, source, max_seconds)
    mono = channels.mean(axis=0) if channels.shape[0] > 1 else channels[0]
    return resample(mono, native_rate, sr)


def header_seconds(source: MediaSource) -> float | None:
    """The audio's duration as its container's header states it, without decoding (None: it does not say,
    or the input is not audio this can read; decoding then tells)."""
    data = check_bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    open_source = (lambda: io.BytesIO(data)) if data is not None else (lambda: os.fspath(source))
    if read_head(source).startswith(_SOUNDFILE_MAGIC):
        import soundfile

        try:
            info = soundfile.info(open_source())
            if 0 < info.frames < _UNKNOWN_FRAMES and info.samplerate > 0:
                return info.frames / info.samplerate
        except Exception:  # not libsndfile's: PyAV may know
            pass
    import av

    try:
        with av.open(open_source(), mode="r") as container:
            if not container.streams.audio:
                return None
            return _header_seconds(container, container.streams.audio[0])
    except av.error.FFmpegError:
        return None


def resample(samples: Samples, orig_sr: int, target_sr: int) -> Samples:
    """Band-limited resampling (soxr HQ), float32 out; a no-op when the rates match."""
    samples = np.asarray(samples, dtype=np.float32)
    if orig_sr == target_sr or samples.size == 0:
        return np.ascontiguousarray(samples)
    import soxr  # librosa's own resampler backend; imported here to keep module import cheap

    return soxr.resample(samples, orig_sr, target_sr, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


def audio_duration(samples: Samples, sr: int = INPUT_SAMPLE_RATE) -> float:
    """Length of `samples` in seconds."""
    return len(samples) / float(sr)


# Containers libsndfile reads without a word on stderr; anything else (mp3 above all: libsndfile hands it
# to mpg123, which prints "Note: Illegal Audio-MPEG-Header ..." lines of its own) goes to PyAV, which
# reports every problem to us.
_SOUNDFILE_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM")


def _decode(open_source, name: str, source: MediaSource,
            max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(channels [C, n] float32, native sample rate): soundfile for wav/flac/ogg/aiff, PyAV for the rest."""
    head = read_head(source)
    if head.startswith(_SOUNDFILE_MAGIC):
        decoded = _decode_with_soundfile(open_source(), name, max_seconds)
        if decoded is not None:
            return decoded
    return decode_with_av(open_source(), name, head=head, max_seconds=max_seconds)


def _too_long(seconds: float, max_seconds: float, name: str) -> AudioTooLong:
    return AudioTooLong(f"the audio is {seconds:.0f} s long (or more), over the limit of {max_seconds:g} s", name)


def _decode_with_soundfile(file, name: str = "", max_seconds: float | None = None) -> tuple[np.ndarray, int] | None:
    """libsndfile's decode, or None when it cannot read this input (PyAV gets a try then)."""
    import soundfile

    try:
        with soundfile.SoundFile(file) as sound:
            rate = sound.samplerate
            # libsndfile's frame count comes from the header (wav, aiff: the data chunk's size; flac: STREAMINFO,
            # which a streamed FLAC leaves unknown: then the count is read as it is decoded)
            known = 0 < sound.frames < _UNKNOWN_FRAMES
            if max_seconds is not None and known and sound.frames > max_seconds * rate:
                raise _too_long(sound.frames / rate, max_seconds, name)
            if max_seconds is None or known:
                data = sound.read(dtype="float32", always_2d=True)
            else:
                data = _read_capped(sound, max_seconds, name)
    except AudioTooLong:
        raise
    except Exception:  # libsndfile raises several types for "not mine"; PyAV decides what it is
        return None
    if data.shape[0] == 0:
        return None  # a header without samples: let PyAV word the error (or find more data)
    return np.ascontiguousarray(data.T), int(rate)


_UNKNOWN_FRAMES = 1 << 40  # libsndfile's frame count for a stream whose header does not say (about SF_COUNT_MAX)


def _read_capped(sound, max_seconds: float, name: str) -> np.ndarray:
    """Blocks of ``sound`` until its end, refused as soon as they pass ``max_seconds``."""
    blocks, frames = [], 0
    for block in sound.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
        frames += block.shape[0]
        if frames > max_seconds * sound.samplerate:
            raise _too_long(frames / sound.samplerate, max_seconds, name)
        blocks.append(block.copy())
    return np.concatenate(blocks) if blocks else np.zeros((0, sound.channels), dtype=np.float32)


def decode_with_av(
    file: Union[str, io.BytesIO], name: str, head: bytes = b"", required: bool = True,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int] | None:
    """Decode the first audio stream with PyAV: (channels [C, n] float32, native rate).

    With required=False a container without an audio stream gives None instead of an error.
    """
    import av

    try:
        container = av.open(file, mode="r")
    except av.error.FFmpegError as exc:
        raise InputError(_undecodable_message(head, exc), name) from None
    with container:
        if not container.streams.audio:
            if not required:
                return None
            raise InputError(_no_audio_message(container, head), name)
        stream = container.streams.audio[0]
        if max_seconds is not None:
            seconds = _header_seconds(container, stream)
            if seconds is not None and seconds > max_seconds:
                raise _too_long(seconds, max_seconds, name)
        try:
            blocks, rate, damaged = _decode_stream(container, stream, max_seconds, name)
        except av.error.FFmpegError as exc:
            raise InputError(f"corrupt audio data ({_short(exc)})", name) from None
    if not blocks:
        raise InputError("no audio samples could be decoded (corrupt or truncated file?)", name)
    if damaged:
        logging.getLogger(__name__).warning("%s: %d damaged audio packet(s) skipped (corrupt or truncated file?)",
                                            name, damaged)
    return np.concatenate(blocks, axis=1).astype(np.float32, copy=False), rate


def _header_seconds(container, stream) -> float | None:
    """The stream's duration as its container states it (None when it does not)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _decode_stream(container, stream, max_seconds: float | None = None,
                   name: str = "") -> tuple[list[np.ndarray], int, int]:
    """All frames of one audio stream as planar float blocks [C, n], the stream's rate, and how many
    damaged packets were skipped (as ffmpeg and mpg123 do: the rest of a scratched file still counts)."""
    import av

    decoded_seconds = 0.0

    # fltp at the stream's own rate and layout: only the sample format changes here; the rate change
    # is done afterwards by soxr so every input goes through the same resampler.
    converter = av.AudioResampler(format="fltp")
    blocks: list[np.ndarray] = []
    rate = stream.codec_context.sample_rate or stream.rate
    damaged = 0
    for packet in _packets(container, stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            damaged += 1
            continue
        for frame in frames:
            rate = frame.sample_rate
            decoded_seconds += frame.samples / max(rate, 1)
            if max_seconds is not None and decoded_seconds > max_seconds:
                raise _too_long(decoded_seconds, max_seconds, name)
            for converted in converter.resample(frame):
                blocks.append(converted.to_ndarray())
    for converted in converter.resample(None):
        blocks.append(converted.to_ndarray())
    blocks = [block for block in blocks if block.shape[-1] > 0]
    return blocks, int(rate), damaged


def _packets(container, stream):
    """The stream's packets (the last one, empty, flushes the decoder); a container that breaks off ends."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            return  # a truncated or garbled container: what came before is kept
        yield packet


def _no_audio_message(container, head: bytes) -> str:
    if guess_kind(head) == "image":
        return "not an audio file (looks like an image)"
    if container.streams.video:
        return "no audio track (a video without sound)"
    return "not an audio file (no audio stream found)"


def _undecodable_message(head: bytes, exc: Exception) -> str:
    kind = guess_kind(head)
    if kind == "text":
        return "not an audio file (looks like text)"
    if kind == "image":
        return "not an audio file (looks like an image)"
    if kind == "media":
        return f"corrupt or truncated audio file ({_short(exc)})"
    return f"not a readable audio file ({_short(exc)})"


def _short(exc: Exception) -> str:
    """FFmpeg's reason without the file name it repeats."""
    return getattr(exc, "strerror", None) or str(exc).split(":")[0]
