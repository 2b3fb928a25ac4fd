"""`minicpmo live`: a spoken conversation in the terminal, on the model here or through --server.

Audio goes in as OpenAI Realtime events either way (api/live_client.py): a recording streamed at real-time
speed (--input, or the sound of --video), or the microphone (sounddevice, the `live` extra). The answers are
played on the speaker (microphone mode) and/or written to -o; both sides' transcripts go to stdout, one line
each (the user's line comes once the model has answered and transcribed the turn). Ctrl-C ends cleanly
(exit 130): what was answered so far stays in the -o file.

A conversation longer than the model's context goes on: the oldest turns are forgotten (--truncation, as
the Realtime session's ``truncation``), with a one-line note on stderr each time (not with -q).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from minicpmo_cli.cli import common

HELP = common.examples_help(
    "A live spoken conversation: the server's (or this process's) voice activity detection ends each turn, "
    "the model answers in speech and text as it speaks. Without --input it listens to the microphone and "
    "answers on the speaker (pip install 'minicpmo-cli[live]'). Transcripts go to stdout.",
    "minicpmo live",
    "minicpmo live --input question.wav -o answer.wav",
    "minicpmo live --input question.wav --video camera.mp4 -o answer.wav",
    "minicpmo --server http://127.0.0.1:8000 live --input question.wav -o answer.wav",
)


def register(app: typer.Typer) -> None:
    app.command("live", help=HELP)(live)


def live(
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Stream this recording as if spoken."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the spoken answers to this wav."),
    video: Optional[Path] = typer.Option(None, "--video", help="Send this video's frames (1 per second); its "
                                                               "sound is the input when --input is not given."),
    speed: float = typer.Option(1.0, "--speed", help="Pace of --input: 1 = real time, 0 = as fast as sent."),
    voice: Optional[str] = typer.Option(None, "--voice", help="Answer in a saved voice (see `voices`)."),
    instructions: Optional[str] = typer.Option(None, "--instructions", help="Extra system instructions."),
    silence_ms: int = typer.Option(500, "--silence-ms", min=32, max=10000,
                                   help="Silence that ends a turn (ms)."),
    threshold: float = typer.Option(0.5, "--vad-threshold", min=0.01, max=0.99, help="Speech probability."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing -o file."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, max=4096,
                                                 help="Longest answer, in tokens."),
    truncation: str = typer.Option("auto", "--truncation",
                                   help="When the conversation outgrows the model's context: auto (forget the "
                                        "oldest turns, keeping 75% of the room), a share to keep from 0 to 1, "
                                        "or disabled (the turn that does not fit fails)."),
) -> None:
    from minicpmo_cli.errors import UsageError

    if speed < 0:
        raise typer.BadParameter(f"--speed must be 0 or more, not {speed}")
    truncation_setting = _truncation(truncation)
    if output is not None and common.wav_output_target(str(output), overwrite) is None:
        raise UsageError("-o needs a wav file name (stdout carries the transcripts)")
    audio, frames = _recorded_input(input, video)
    if audio is None:
        _sounddevice()  # no recording: the microphone, whose library must be there before the model loads
    session = {"type": "realtime", "instructions": instructions, "seed": common.options().seed,
               "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms,
                                                      "threshold": threshold}},
                         "output": {"voice": voice or "alloy"}}}
    if common.options().seed is None:
        session.pop("seed")
    session["truncation"] = truncation_setting
    if max_new_tokens is not None:
        session["max_output_tokens"] = max_new_tokens
    transport = _transport(voice)
    try:
        asyncio.run(_run(transport, session, audio, frames, speed, output))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise  # exit 130; the -o file keeps what was answered (WavStreamWriter)


def _truncation(value: str):
    """--truncation -> the session's ``truncation``."""
    if value in ("auto", "disabled"):
        return value
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise typer.BadParameter(f"--truncation must be auto, disabled or a share from 0 to 1, not {value!r}")
    return {"type": "retention_ratio", "retention_ratio": ratio}


def _recorded_input(input: Optional[Path], video: Optional[Path]):
    """(24 kHz samples or None for the microphone, frames) from --input / --video; bad files fail now."""
    from minicpmo_cli.media.audio import load_audio, resample
    from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

    frames: list = []
    audio = None
    if video is not None:
        from minicpmo_cli.media.video import load_video_audio, probe_video, sample_frames

        info = probe_video(video)
        frames = sample_frames(video, fps=1.0, max_frames=max(1, int(info.duration) + 1))
        if input is None and info.has_audio:
            audio = load_video_audio(video)
    if input is not None:
        audio = load_audio(str(input))
    if audio is not None:
        audio = resample(audio, INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE)
    return audio, frames


def _transport(voice: Optional[str]):
    from minicpmo_cli.api.live_client import LocalTransport, WebSocketTransport

    server = common.options().server
    if server:
        if not server.startswith(("http://", "https://")):
            from minicpmo_cli.errors import UsageError

            raise UsageError(f"--server must be an http(s) URL, not {server!r}")
        return WebSocketTransport(server, os.environ.get("MINICPMO_API_KEY"))
    from minicpmo_cli.api.voices import resolve_voice

    engine = common.load_engine(vision=True, audio=True, tts=True)
    return LocalTransport(engine, resolve_voice=lambda name: None if name == "alloy" else resolve_voice(name))


async def _run(transport, session: dict, audio, frames: list, speed: float, output: Optional[Path]) -> None:
    from contextlib import nullcontext

    from minicpmo_cli.api.live_client import converse, stream_blocks, stream_recording
    from minicpmo_cli.outputs import WavStreamWriter

    writer = WavStreamWriter(output) if output is not None else None
    speaker = None if audio is not None else _speaker()
    printer = _Printer(writer, speaker)
    with writer if writer is not None else nullcontext():
        try:
            if audio is not None:
                conversation = await converse(transport, session,
                                              lambda: stream_recording(transport, audio, frames, speed), printer)
            else:
                conversation = await converse(transport, session, lambda: stream_blocks(transport, _microphone()),
                                              printer, until_settled=False)
        except asyncio.CancelledError:  # Ctrl-C reaches the task as a cancellation: the wav is kept as on Ctrl-C
            raise KeyboardInterrupt from None
    printer.end_line()
    if writer is not None:
        common.info(f"wrote {output} ({writer.seconds:.1f} s)")
    if conversation.errors and conversation.responses == 0:
        from minicpmo_cli.errors import MiniCPMOError

        raise MiniCPMOError(f"live: {conversation.errors[0]}")


class _Printer:
    """Transcripts to stdout as they come; answer audio to the wav and/or the speaker."""

    def __init__(self, writer, speaker) -> None:
        self.writer, self.speaker = writer, speaker
        self.open_line = False

    def end_line(self) -> None:
        if self.open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open_line = False

    def __call__(self, event: dict) -> None:
        import base64

        from minicpmo_cli.api.live_model import pcm16_samples

        kind = event.get("type")
        if kind == "response.output_audio.delta":
            samples = pcm16_samples(base64.b64decode(event["delta"]))
            if self.writer is not None:
                self.writer.write(samples)
            if self.speaker is not None:
                self.speaker.write(samples.reshape(-1, 1))
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            if not self.open_line:
                sys.stdout.write("assistant: ")
                self.open_line = True
            sys.stdout.write(event["delta"])
            sys.stdout.flush()
        elif kind == "response.done":
            self.end_line()
            context = event["response"].get("context") or {}
            if context.get("dropped_item_ids"):
                common.info(f"note: the conversation outgrew the model's context ({context.get('max_tokens')} "
                            f"tokens): it forgot its {len(context['dropped_item_ids'])} oldest items (user turns "
                            "and answers)")
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.end_line()
            sys.stdout.write(f"user: {event.get('transcript', '')}\n")
            sys.stdout.flush()
        elif kind == "error":
            common.warn(f"server: {event['error'].get('message')}")


def _sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        from minicpmo_cli.errors import EnvironmentProblem

        raise EnvironmentProblem("the microphone needs sounddevice and PortAudio: pip install "
                                 f"'minicpmo-cli[live]' (or give --input FILE) ({exc})") from None
    return sounddevice


def _speaker():
    stream = _sounddevice().OutputStream(samplerate=24000, channels=1, dtype="float32")
    stream.start()
    return stream


async def _microphone():
    """0.2 s blocks of 24 kHz float32 from the default input device, until Ctrl-C."""
    import numpy as np

    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def callback(data, frames, time, status) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, np.array(data[:, 0], dtype=np.float32))

    with _sounddevice().InputStream(samplerate=24000, channels=1, dtype="float32", blocksize=4800,
                                    callback=callback):
        common.info("listening (Ctrl-C ends)")
        while True:
            yield await queue.get()
