"""Video tasks: describe a video (frames + its sound), and omni mode (units of 1 frame + 1 s of audio).

- :func:`describe_video` follows the guide's "chat with video": frames at 1 fps, uniformly thinned to at most
  64, ``use_image_id=False``, ``max_slice_nums=2``, sampling with up to 1024 new tokens; the audio track (when
  there is one) goes into the same message after the frames.
- :func:`omni` follows the guide's omni "normal generate": the omni system prompt (optionally with a
  reference voice), one user message holding ``["<unit>", frame, 1 s audio]`` per second of video, joined
  without separators (``omni_input=True``), one slice per frame, no image ids, the TTS template, sampling
  at temperature 0.5 with repetition penalty 1.2 and up to 4096 new tokens; the spoken answer at 24 kHz.
- :func:`omni_stream` follows the guide's streaming inference: a new session, the system prompt and then the
  units prefilled one by one while the file is decoded, then ``streaming_generate`` (the reference's
  streaming defaults: sampling, temperature 0.7, repetition penalty 1.05, up to 512 new tokens).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from minicpmo_cli.api.engine import DecodeOptions, Engine, seed_call
from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation.presets import resolve
from minicpmo_cli.units import FRAMES_PER_SECOND, MAX_AUDIO_FRAMES, OUTPUT_SAMPLE_RATE

DEFAULT_VIDEO_PROMPT = "Describe the video"  # the guide's question
DEFAULT_FPS = 1.0  # frames per second of video for describe-video
MAX_FRAMES = 64  # the guide's MAX_NUM_FRAMES
# Decoding presets (generation/presets.py): the guide's "chat with video", omni "normal generate", and the
# reference's streaming_generate defaults.
VIDEO_TASK, OMNI_TASK, OMNI_STREAM_TASK = "describe-video", "omni", "omni-stream"
VIDEO_PROCESSING = {"use_image_id": False, "max_slice_nums": 2}  # the guide's settings for video frames
OMNI_PROCESSING = {"omni_input": True, "use_image_id": False, "max_slice_nums": 1}
LANGUAGES = ("en", "zh")


@dataclass
class VideoAnswer:
    path: str
    text: str
    frames: int  # frames given to the model
    has_audio: bool  # whether the sound track went in too


@dataclass
class OmniAnswer:
    path: str
    text: str
    units: int  # 1 s units given to the model
    audio: np.ndarray | None = None  # float32 mono at sample_rate; None without speech
    sample_rate: int = OUTPUT_SAMPLE_RATE
    output: Path | None = None  # where the wav was written


@dataclass
class OmniChunk:
    """One streamed piece: new answer text and the speech that goes with it (empty without speech)."""

    text: str
    audio: np.ndarray
    sample_rate: int = OUTPUT_SAMPLE_RATE


# ---------------------------------------------------------------------------------------------- inputs
def video_message_parts(path: str | os.PathLike[str], max_frames: int = MAX_FRAMES, fps: float = DEFAULT_FPS,
                        with_audio: bool = True) -> tuple[list[Any], list[dict[str, Any]]]:
    """Frames (and the sound track, when there is one and ``with_audio``) for a user message.

    Returns (parts for the model: PIL frames then 16 kHz float32 audio, sources for a saved transcript).
    This is what ``chat``'s ``/video PATH`` and ``--video`` attach.
    """
    from minicpmo_cli.media.video import load_video_audio, probe_video, sample_frames

    info = probe_video(path)
    frames = sample_frames(path, fps=fps, max_frames=max_frames)
    audio = load_video_audio(path) if (with_audio and info.has_audio) else None
    parts: list[Any] = list(frames) + ([audio] if audio is not None and audio.size else [])
    source = {"type": "video", "path": str(path), "frames": len(frames), "audio": len(parts) > len(frames)}
    return parts, [source]


def load_reference_audio(ref: str | os.PathLike[str] | np.ndarray | None) -> np.ndarray | None:
    """A reference voice as 16 kHz mono float32: a file path is decoded, an array is used as it is."""
    if ref is None or isinstance(ref, np.ndarray):
        return ref
    from minicpmo_cli.media.audio import load_audio

    return load_audio(ref)


def omni_system_message(ref_audio=None, language: str = "en") -> dict[str, Any]:
    """The guide's omni system prompt (``get_sys_prompt(mode="omni")``), with the voice when given."""
    from minicpmo_cli.processing.prompts import get_sys_prompt

    if language not in LANGUAGES:
        raise UsageError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
    return get_sys_prompt(ref_audio=load_reference_audio(ref_audio), mode="omni", language=language)


def omni_unit_contents(path: str | os.PathLike[str]) -> Iterator[list[Any]]:
    """``["<unit>", frame, 1 s of 16 kHz audio]`` per second of video, decoded lazily (silent video: zeros)."""
    from minicpmo_cli.media.video import iter_video_units

    for frame, audio in iter_video_units(path):
        yield ["<unit>", frame, audio]


# ---------------------------------------------------------------------------------------------- describe
def describe_video_stream(engine: Engine, path: str | os.PathLike[str], prompt: str | None = None,
                          decode: DecodeOptions | None = None, max_frames: int = MAX_FRAMES,
                          fps: float = DEFAULT_FPS) -> Iterator[str]:
    """Describe a video, yielding the answer piece by piece (one piece with beam search)."""
    settings = resolve(VIDEO_TASK, decode)  # contradictory options fail before the video is read
    from minicpmo_cli.media.video import probe_video
    from minicpmo_cli.processing.limits import check_prompt_fits, check_video_fits

    with_audio = engine.towers.get("audio", True)
    info = probe_video(path)  # measured from the header before anything is decoded
    check_video_fits(engine, info, _planned_frame_count(info, fps, max_frames), with_audio, unit_mode=False)
    parts, _ = video_message_parts(path, max_frames=max_frames, fps=fps, with_audio=with_audio)
    msgs = [{"role": "user", "content": parts + [prompt or DEFAULT_VIDEO_PROMPT]}]
    check_prompt_fits(engine, msgs, **VIDEO_PROCESSING)
    yield from engine.text_pieces(msgs, settings, **VIDEO_PROCESSING)


def describe_video(engine: Engine, path: str | os.PathLike[str], prompt: str | None = None,
                   decode: DecodeOptions | None = None, max_frames: int = MAX_FRAMES,
                   fps: float = DEFAULT_FPS) -> VideoAnswer:
    """Describe a video (frames at ``fps``, at most ``max_frames``, plus its sound track)."""
    from minicpmo_cli.media.video import probe_video

    info = probe_video(path)
    text = "".join(describe_video_stream(engine, path, prompt, decode, max_frames, fps))
    frames = _planned_frame_count(info, fps, max_frames)
    return VideoAnswer(path=str(path), text=text, frames=frames,
                       has_audio=bool(info.has_audio and engine.towers.get("audio", True)))


def _planned_frame_count(info, fps: float, max_frames: int) -> int:
    step = max(1, round(info.fps / fps)) if info.fps > 0 else 1
    return min(max_frames, len(range(0, max(info.frame_count, 1), step)))


# ---------------------------------------------------------------------------------------------- omni
def _speech_frame_cap(max_audio_seconds: float | None) -> int:
    if max_audio_seconds is None:
        return MAX_AUDIO_FRAMES
    # Rounded up, not to the nearest frame: the audio is then trimmed to exactly max_audio_seconds (_trim).
    return max(1, math.ceil(max_audio_seconds * FRAMES_PER_SECOND))


def _trim(audio: np.ndarray, max_audio_seconds: float | None) -> np.ndarray:
    if max_audio_seconds is None:
        return audio
    return audio[: int(round(max_audio_seconds * OUTPUT_SAMPLE_RATE))]


def omni(engine: Engine, path: str | os.PathLike[str], prompt: str | None = None,
         decode: DecodeOptions | None = None, *, ref_audio=None, language: str = "en", speak: bool = True,
         output: str | os.PathLike[str] | None = None, max_audio_seconds: float | None = None) -> OmniAnswer:
    """Omni mode, normal generate: the whole video as units in one message; text plus (``speak``) speech.

    ``ref_audio``: a voice to answer in (path or 16 kHz array). ``output``: write the speech there (24 kHz
    mono PCM16, atomically). ``max_audio_seconds``: cut the speech after that long.
    """
    from minicpmo_cli.outputs import write_wav

    settings = resolve(OMNI_TASK, decode)
    system = omni_system_message(ref_audio, language)
    _check_units_fit(engine, path)
    units = [item for unit in omni_unit_contents(path) for item in unit]
    count = len(units) // 3
    content = units + ([prompt] if prompt else [])
    msgs = [system, {"role": "user", "content": content}]
    if speak:
        engine.enable_tts()
    result = engine.generate(msgs, settings, use_tts_template=True, generate_audio=speak, **OMNI_PROCESSING)
    if not speak:
        return OmniAnswer(path=str(path), text=result, units=count)
    audio = _trim(np.asarray(result.audio_wav, dtype=np.float32).reshape(-1), max_audio_seconds)
    written = write_wav(output, audio, OUTPUT_SAMPLE_RATE) if output is not None else None
    return OmniAnswer(path=str(path), text=result.text, units=count, audio=audio, output=written)


def omni_stream(engine: Engine, path: str | os.PathLike[str], prompt: str | None = None,
                decode: DecodeOptions | None = None, *, ref_audio=None, language: str = "en", speak: bool = True,
                session_id: str | None = None, max_audio_seconds: float | None = None,
                on_unit: Callable[[int], None] | None = None) -> Iterator[OmniChunk]:
    """Omni mode, streaming: prefill the system prompt, then each unit as soon as it is decoded (and the
    prompt, if any), then yield :class:`OmniChunk` s as the answer is generated.

    Nothing runs until the iterator is consumed. ``on_unit(i)`` is called after unit ``i`` is prefilled.
    ``max_audio_seconds`` caps the speech generated after the text has ended (and the audio returned).
    """
    from uuid import uuid4

    from minicpmo_cli.generation.session import reset_session, streaming_generate, streaming_prefill

    settings = resolve(OMNI_STREAM_TASK, decode)
    _check_streamable(settings)
    model, processor = engine.model, engine.processor
    system = omni_system_message(ref_audio, language)
    _check_units_fit(engine, path)
    if speak:
        engine.enable_tts()
    session_id = session_id or uuid4().hex
    reset_session(model)
    streaming_prefill(model, session_id, [system], processor=processor)
    for index, unit in enumerate(omni_unit_contents(path)):
        streaming_prefill(model, session_id, [{"role": "user", "content": unit}], processor=processor)
        if on_unit is not None:
            on_unit(index)
    if prompt:
        streaming_prefill(model, session_id, [{"role": "user", "content": [prompt]}], processor=processor)
    seed_call(settings.seed)
    items = streaming_generate(model, session_id, processor=processor, use_tts=speak,
                               tts_max_new_tokens=_speech_frame_cap(max_audio_seconds), decode=settings.decode)
    budget = None if max_audio_seconds is None else int(round(max_audio_seconds * OUTPUT_SAMPLE_RATE))
    for item in items:
        if not speak:
            yield OmniChunk(text=item["text"], audio=np.zeros(0, dtype=np.float32))
            continue
        audio = np.asarray(item.audio_wav, dtype=np.float32).reshape(-1)
        if budget is not None:
            audio, budget = audio[:budget], max(0, budget - len(audio))
        yield OmniChunk(text=item.text, audio=audio, sample_rate=item.sampling_rate or OUTPUT_SAMPLE_RATE)


def _check_streamable(settings) -> None:
    """Before any unit is prefilled: the streaming session decodes greedily or by sampling."""
    if settings.decode.beam_search:
        raise UsageError(f"num_beams={settings.decode.num_beams}: streaming omni decodes greedily or by sampling, "
                         "beam search cannot stream (leave out num_beams)", parameters=("num_beams",))


def _check_units_fit(engine: Engine, path) -> None:
    """A video longer than the context holds (in 1 s units) fails before a frame is decoded."""
    from minicpmo_cli.media.video import probe_video
    from minicpmo_cli.processing.limits import check_video_fits

    check_video_fits(engine, probe_video(path), 0, True, unit_mode=True)
