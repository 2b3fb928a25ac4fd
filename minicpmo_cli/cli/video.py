"""`minicpmo describe-video` and `minicpmo omni` (normal and `--stream`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from minicpmo_cli.cli import common

if TYPE_CHECKING:
    from minicpmo_cli.api.engine import DecodeOptions

DESCRIBE_HELP = common.examples_help(
    "Describe a video: frames sampled at --fps (default 1 per second, at most --max-frames, default 64) "
    "plus its sound track when it has one. The answer streams to stdout.",
    "minicpmo describe-video clip.mp4",
    'minicpmo describe-video clip.mp4 "What happens after the dog jumps?"',
    "minicpmo describe-video lecture.mkv --fps 0.5 --max-frames 32 --max-new-tokens 256",
)
OMNI_HELP = common.examples_help(
    "Omni mode: the video as units of one frame and one second of sound, answered in text on stdout and, "
    "with -o, in speech (24 kHz mono wav). --stream prefills unit by unit while the file is decoded and "
    "prints text / appends audio as they are generated (Ctrl-C keeps what was spoken).",
    "minicpmo omni clip.mp4 -o answer.wav",
    'minicpmo omni clip.mp4 "What is the person saying?" --stream -o answer.wav',
    "minicpmo omni clip.mp4 --ref my_voice.wav --language en -o answer.wav",
    "minicpmo omni clip.mp4 --stream",
)


def register(app: typer.Typer) -> None:
    app.command("describe-video", help=DESCRIBE_HELP)(describe_video)
    app.command("omni", help=OMNI_HELP)(omni)


@common.decoding_options(task="describe-video")
def describe_video(
    video: Path = typer.Argument(..., help="The video file (mp4, mkv, webm, mov, ...)."),
    prompt: Optional[str] = typer.Argument(None, help='The question (default: "Describe the video").'),
    max_frames: int = typer.Option(64, "--max-frames", min=1, help="Most frames given to the model."),
    fps: float = typer.Option(1.0, "--fps", help="Frames sampled per second of video (> 0)."),
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.api.video import DEFAULT_FPS, MAX_FRAMES, describe_video_stream
    from minicpmo_cli.media.video import probe_video

    if fps <= 0:
        raise typer.BadParameter(f"--fps must be > 0, not {fps}")
    info = probe_video(video)  # a bad file fails here, before the slow model load
    common.debug(f"{video}: {info.duration:.1f} s at {info.fps:.2f} fps, sound: {info.has_audio}")
    if common.options().server:
        from minicpmo_cli.cli import remote

        sampling = (None if fps == DEFAULT_FPS else fps, None if max_frames == MAX_FRAMES else max_frames)
        pieces = remote.describe_video_stream(remote.connect(), video, prompt, decode, *sampling)
    else:
        engine = common.load_engine(vision=True, audio=info.has_audio, tts=False)
        pieces = describe_video_stream(engine, video, prompt, decode, max_frames=max_frames, fps=fps)
    for piece in pieces:
        common.first_output("first answer text")
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@common.decoding_options(task="omni")
def omni(
    video: Path = typer.Argument(..., help="The video file (mp4, mkv, webm, mov, ...)."),
    prompt: Optional[str] = typer.Argument(None, help="Optional text after the video (default: none)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the spoken answer to this wav."),
    stream: bool = typer.Option(False, "--stream", help="Prefill unit by unit and stream text and audio."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Answer in the voice of this audio clip."),
    voice: Optional[str] = typer.Option(None, "--voice", help="Answer in a saved voice (see `clone --save-voice`)."),
    language: str = typer.Option("en", "--language", help="Language of the system prompt: en or zh."),
    max_audio_seconds: Optional[float] = typer.Option(None, "--max-audio-seconds",
                                                      help="Cut the spoken answer after this many seconds."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing -o file."),
    *,
    decode: DecodeOptions,
) -> None:
    from minicpmo_cli.errors import UsageError
    from minicpmo_cli.media.video import probe_video

    if language not in ("en", "zh"):
        raise typer.BadParameter(f"--language must be en or zh, not {language!r}")
    if max_audio_seconds is not None and max_audio_seconds <= 0:
        raise typer.BadParameter(f"--max-audio-seconds must be > 0, not {max_audio_seconds}")
    if ref is not None and voice is not None:
        raise UsageError("give either --ref or --voice, not both")
    if output is not None and common.wav_output_target(str(output), overwrite) is None:
        raise UsageError("-o needs a wav file name (stdout carries the text answer)")
    probe_video(video)  # a bad file fails here, before the slow model load
    ref_audio = _reference_voice(ref, voice)
    from minicpmo_cli.cli.remote import runs_locally

    runs_locally("omni", "the server has no omni route (units of one frame and one second of sound)")
    engine = common.load_engine(vision=True, audio=True, tts=output is not None)
    options = dict(ref_audio=ref_audio, language=language, speak=output is not None,
                   max_audio_seconds=max_audio_seconds)
    if stream:
        _omni_streaming(engine, video, prompt, decode, output, options)
    else:
        _omni_whole(engine, video, prompt, decode, output, options)


def _reference_voice(ref: Optional[Path], voice: Optional[str]):
    """--ref PATH, or --voice NAME looked up among saved voices (a path to a clip also works)."""
    from minicpmo_cli.api.video import load_reference_audio
    from minicpmo_cli.api.voices import resolve_voice

    if ref is not None:
        return load_reference_audio(ref)
    return None if voice is None else resolve_voice(voice)


def _omni_whole(engine, video: Path, prompt, decode, output: Optional[Path], options: dict) -> None:
    from minicpmo_cli.api.video import omni as run_omni

    answer = run_omni(engine, video, prompt, decode, output=output, **options)
    common.first_output("answer")
    sys.stdout.write(answer.text + "\n")
    sys.stdout.flush()
    if answer.output is not None:
        common.info(f"wrote {answer.output} ({len(answer.audio) / answer.sample_rate:.1f} s)")


def _omni_streaming(engine, video: Path, prompt, decode, output: Optional[Path], options: dict) -> None:
    from contextlib import nullcontext

    from minicpmo_cli.api.video import omni_stream
    from minicpmo_cli.outputs import WavStreamWriter

    chunks = omni_stream(engine, video, prompt, decode, on_unit=lambda i: common.debug(f"prefilled unit {i + 1}"),
                         **options)
    writer = WavStreamWriter(output) if output is not None else None
    try:
        with writer if writer is not None else nullcontext():
            for chunk in chunks:
                common.first_output("first answer piece")
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if writer is not None and len(chunk.audio):
                    writer.write(chunk.audio)
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if writer is not None:
        common.info(f"wrote {output} ({writer.seconds:.1f} s)")
