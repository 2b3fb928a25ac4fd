"""Video decoding with PyAV: probing, frame sampling for describe-video, and omni units (1 frame + 1 s audio).

The sampling rules follow the MiniCPM-o 2.6 guide, which used decord and moviepy:
- `sample_frames` is its `encode_video`: every round(avg_fps / fps)-th frame, then uniformly thinned to
  `max_frames` by taking the middle of each of `max_frames` equal groups.
- `iter_video_units` is its `get_video_chunk_content`: ceil(duration) units; unit i shows the frame at
  time i + 1 s (moviepy's `get_frame(i + 1)`: the last frame at or before that time; past the last
  frame, the previous unit's frame) with audio samples [i s, i + 1 s) at 16 kHz.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from minicpmo_cli.errors import InputError
from minicpmo_cli.media import check_readable_file, guess_kind, read_head
from minicpmo_cli.media.audio import decode_with_av, resample
from minicpmo_cli.units import INPUT_SAMPLE_RATE

DEFAULT_SAMPLE_FPS = 1.0  # frames per second of video for describe-video (the guide's choice)
MAX_NUM_FRAMES = 64  # the guide's MAX_NUM_FRAMES: more frames than this are uniformly thinned
UNIT_SECONDS = 1  # s: one omni unit = one frame + this much audio
# moviepy picks frame int(fps * t + 1e-5): this slack, in frames, keeps float error from skipping one
FRAME_TIME_SLACK = 1e-5
# moviepy reads the duration from FFmpeg's banner, which prints it rounded to centiseconds; the unit
# count ceil(duration) is taken from that rounded value.
DURATION_DECIMALS = 2


@dataclass(frozen=True)
class VideoInfo:
    """What probe_video learns from the container headers (plus a packet count when needed)."""

    duration: float  # s, the container's duration (the longest stream)
    fps: float  # average frame rate of the first video stream
    frame_count: int  # frames in the first video stream (counted from packets when the header lacks it)
    has_audio: bool
    width: int
    height: int


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read duration, frame rate, frame count, audio presence and size without decoding frames."""
    file_path = check_readable_file(path)
    with _open_video(file_path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        duration = _container_duration(container, stream)
        frame_count = int(stream.frames or 0)
        if frame_count <= 0:
            frame_count = _count_packets(container, stream)
        if fps <= 0.0 and duration > 0.0:
            fps = frame_count / duration
        return VideoInfo(
            duration=duration,
            fps=fps,
            frame_count=frame_count,
            has_audio=bool(container.streams.audio),
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
        )


def sample_frames(
    path: str | os.PathLike[str], fps: float = DEFAULT_SAMPLE_FPS, max_frames: int = MAX_NUM_FRAMES
) -> list[Image.Image]:
    """RGB frames at about `fps` per second, at most `max_frames` of them (uniformly chosen)."""
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be > 0 and max_frames >= 1 (got fps={fps}, max_frames={max_frames})")
    info = probe_video(path)
    step = max(1, round(info.fps / fps)) if info.fps > 0 else 1
    wanted = list(range(0, max(info.frame_count, 1), step))
    if len(wanted) > max_frames:
        wanted = uniform_sample(wanted, max_frames)
    return _decode_frames_at(path, wanted)


def uniform_sample(items: list, count: int) -> list:
    """`count` items: the middle one of each of `count` equal groups (the guide's uniform_sample)."""
    gap = len(items) / count
    return [items[int(i * gap + gap / 2)] for i in range(count)]


def _decode_frames_at(path: str | os.PathLike[str], indices: list[int]) -> list[Image.Image]:
    """Decode in order and keep the frames at `indices` (0-based decode order = presentation order)."""
    wanted = set(indices)
    picked: dict[int, Image.Image] = {}
    last_index, last_frame = -1, None
    last_wanted = max(indices)
    with contextlib.closing(_iter_frames(path)) as frames:
        for last_index, frame in enumerate(frames):
            last_frame = frame
            if last_index in wanted:
                picked[last_index] = frame.to_image()
            if last_index >= last_wanted:
                break
    if last_frame is None:
        raise InputError("no video frames could be decoded (corrupt or truncated file?)", path)
    # A header can promise more frames than the file holds (truncated files, estimated counts):
    # missing picks repeat the last frame so callers still get the number of frames they planned for.
    tail = last_frame.to_image()
    return [picked.get(index, tail) for index in indices]


def load_video_audio(
    path: str | os.PathLike[str], sr: int = INPUT_SAMPLE_RATE, required: bool = False
) -> np.ndarray | None:
    """The audio track as mono float32 at `sr` Hz; None for a silent video unless `required`."""
    file_path = check_readable_file(path)
    head = read_head(file_path)
    decoded = decode_with_av(os.fspath(file_path), str(file_path), head=head, required=required)
    if decoded is None:
        return None
    channels, rate = decoded
    return resample(channels.mean(axis=0), rate, sr)


def iter_video_units(
    path: str | os.PathLike[str], sr: int = INPUT_SAMPLE_RATE
) -> Iterator[tuple[Image.Image, np.ndarray]]:
    """Yield (frame, 1 s of audio) per second of video, decoding frames lazily.

    Silent videos give 1 s of zeros per unit. The last unit's audio is whatever remains (possibly
    shorter than 1 s, as in the guide); a unit past the end of the audio track gets 1 s of zeros,
    since an empty chunk cannot be encoded.
    """
    info = probe_video(path)
    audio = load_video_audio(path, sr=sr) if info.has_audio else None
    unit_count = max(1, math.ceil(round(info.duration, DURATION_DECIMALS) / UNIT_SECONDS))
    for unit, image in enumerate(_frames_at_unit_ends(path, unit_count, info.fps)):
        yield image, _unit_audio(audio, unit, sr)


def video_units(path: str | os.PathLike[str], sr: int = INPUT_SAMPLE_RATE) -> list[tuple[Image.Image, np.ndarray]]:
    """All omni units of a video as a list (see iter_video_units)."""
    return list(iter_video_units(path, sr=sr))


def _unit_audio(audio: np.ndarray | None, unit: int, sr: int) -> np.ndarray:
    if audio is None:
        return np.zeros(sr * UNIT_SECONDS, dtype=np.float32)
    chunk = audio[sr * UNIT_SECONDS * unit : sr * UNIT_SECONDS * (unit + 1)]
    return chunk if len(chunk) else np.zeros(sr * UNIT_SECONDS, dtype=np.float32)


def _frames_at_unit_ends(path, unit_count: int, fps: float) -> Iterator[Image.Image]:
    """For unit i, the last frame shown at or before time (i + 1) s (see the module docstring).

    Reference quirk, reproduced: moviepy's reader cannot read past the last frame and then returns the
    frame it returned before, so a unit whose time lies after the video's last frame (t >= last frame
    time + 1/fps) repeats the previous unit's frame (the first frame for unit 0), not the last frame.
    """
    slack = FRAME_TIME_SLACK / fps if fps > 0 else 0.0
    frame_period = 1.0 / fps if fps > 0 else 0.0
    unit = 0
    first = previous = None
    last_yielded: Image.Image | None = None
    with contextlib.closing(_iter_frames(path)) as frames:
        for frame in frames:
            while unit < unit_count and previous and frame.time_from_start > _unit_end(unit) + slack:
                last_yielded = previous.to_image()
                yield last_yielded
                unit += 1
            if unit >= unit_count:
                return
            first = first or frame
            previous = frame
    if previous is None:
        raise InputError("no video frames could be decoded (corrupt or truncated file?)", path)
    if unit < unit_count and _unit_end(unit) + slack < previous.time_from_start + frame_period:
        last_yielded = previous.to_image()  # the last frame is still on screen at this unit's time
        yield last_yielded
        unit += 1
    past_end_image = last_yielded if last_yielded is not None else first.to_image()
    for _ in range(unit, unit_count):
        yield past_end_image


def _unit_end(unit: int) -> float:
    return float((unit + 1) * UNIT_SECONDS)


class _TimedFrame:
    """A decoded frame with its time counted from the stream's first timestamp."""

    __slots__ = ("frame", "time_from_start")

    def __init__(self, frame, time_from_start: float) -> None:
        self.frame = frame
        self.time_from_start = time_from_start

    def to_image(self) -> Image.Image:
        return self.frame.to_image()  # RGB24


def _iter_frames(path: str | os.PathLike[str]) -> Iterator[_TimedFrame]:
    """Decode the first video stream in presentation order; the container closes when iteration ends."""
    import av

    file_path = check_readable_file(path)
    with _open_video(file_path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding: same frames, faster
        start = stream.start_time if stream.start_time is not None else 0
        time_base = float(stream.time_base) if stream.time_base else 0.0
        index = 0
        try:
            for frame in container.decode(stream):
                pts = frame.pts
                # Frames without timestamps are placed by their index, assuming a constant rate.
                if pts is not None:
                    seconds = (pts - start) * time_base
                else:
                    seconds = index / float(stream.average_rate or 1)
                yield _TimedFrame(frame, seconds)
                index += 1
        except av.error.FFmpegError as exc:
            if index == 0:
                raise InputError(f"corrupt video data ({_ffmpeg_reason(exc)})", file_path) from None
            # Damage after some good frames: keep what decoded (like players do).


def _open_video(file_path):
    """av.open with one-line InputErrors; the result has at least one video stream."""
    import av

    kind = guess_kind(read_head(file_path))
    if kind == "image":
        # FFmpeg would open a still image as a one-frame "video"; a user passing one meant something else.
        raise InputError("not a video (looks like an image)", file_path)
    try:
        container = av.open(os.fspath(file_path), mode="r")
    except av.error.FFmpegError as exc:
        reason = _ffmpeg_reason(exc)
        message = {
            "text": "not a video (looks like text)",
            "media": f"corrupt or truncated video file ({reason})",
        }.get(kind, f"not a readable video file ({reason})")
        raise InputError(message, file_path) from None
    if not container.streams.video:
        container.close()
        raise InputError("no video stream (an audio-only file?)", file_path)
    return container


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's reason without the file name PyAV appends."""
    return getattr(exc, "strerror", None) or str(exc)


def _container_duration(container, stream) -> float:
    import av

    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    return 0.0


def _count_packets(container, stream) -> int:
    """Frame count from demuxing (no decoding) for containers such as webm/mkv that do not store it."""
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    container.seek(0)
    return count
