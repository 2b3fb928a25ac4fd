"""The CLI through a running `minicpmo serve` (--server URL / MINICPMO_SERVER): asr, chat, tts and clone send
their work there instead of loading the model, and write the same outputs.

The requests carry exactly what the local command would use (decoding options, --seed, the reference clip as
float32 samples, images as lossless PNG), through the server's OpenAI routes and their extension fields, so
the answers are the same as in local mode. httpx (installed with the openai client and the serve extra) is
imported only in this mode.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from minicpmo_cli.cli import common
from minicpmo_cli.errors import EnvironmentProblem, InputError, MiniCPMOError, UsageError
from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

TIMEOUT = 600.0  # s: a long answer on a busy server


class ServerError(MiniCPMOError):
    """The server refused or failed a request (its one-line message)."""


@dataclass
class RemoteEngine:
    """Stands where an Engine stands in the chat and speech commands; the work happens on the server."""

    url: str
    client: Any = None
    model: str = ""
    has_tts: bool = True
    remote: bool = True

    def enable_tts(self) -> None:  # the server loads its speech tower itself
        pass

    def post(self, path: str, **kwargs):
        import httpx

        try:
            response = self.client.post(path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the server at {self.url} ({exc})") from None
        check(response)
        return response


def is_remote(engine: Any) -> bool:
    return bool(getattr(engine, "remote", False))


def check(response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    error = UsageError if response.status_code == 422 else ServerError
    raise error(f"server: {message}")


def connect(url: str | None = None) -> RemoteEngine:
    """A client for the server at ``url`` (default --server), once its /health says it is ready."""
    try:
        import httpx
    except ImportError:
        raise EnvironmentProblem("--server needs httpx: pip install httpx (or the serve extra)") from None
    url = (url or common.options().server or "").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--server must be an http(s) URL, not {url!r}")
    key = os.environ.get("MINICPMO_API_KEY")
    client = httpx.Client(base_url=url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        health = client.get("/health")
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach the server at {url} ({exc}); start one with: minicpmo serve") from None
    check(health)
    engine = RemoteEngine(url=url, client=client, model=health.json().get("model", ""))
    common.debug(f"using the server at {url} (model {engine.model})")
    return engine


def engine_or_load(**towers) -> Any:
    """The server when --server is given, else the model loaded here."""
    return connect() if common.options().server else common.load_engine(**towers)


# ------------------------------------------------------------------------------------------ encoding
def float_wav_b64(samples: np.ndarray, rate: int = INPUT_SAMPLE_RATE) -> str:
    """Samples as a float32 wav: decoded on the server to exactly these samples (no PCM16 rounding)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _parts(parts: list[Any]) -> list[dict]:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append({"type": "text", "text": part})
        elif isinstance(part, np.ndarray):
            out.append({"type": "input_audio", "input_audio": {"data": float_wav_b64(part), "format": "wav"}})
        else:  # a PIL image
            out.append({"type": "image_url", "image_url": {"url": png_data_url(part)}})
    return out


def chat_body(engine: RemoteEngine, conversation, decode, **extra) -> dict:
    if conversation.video_mode:
        raise UsageError("--video with --server is not supported: run without --server")
    messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
    messages += [{"role": t.role, "content": _parts(t.parts)} for t in conversation.turns]
    body = {"model": engine.model, "messages": messages, "language": conversation.language,
            "max_tokens": decode.max_new_tokens, "temperature": decode.temperature, "top_p": decode.top_p,
            "top_k": decode.top_k, "repetition_penalty": decode.repetition_penalty, "num_beams": decode.num_beams,
            "sampling": decode.sampling, "seed": common.options().seed, **extra}
    if decode.min_new_tokens:
        common.warn("--min-new-tokens is not sent to the server: it is ignored with --server")
    return {k: v for k, v in body.items() if v is not None}


# ------------------------------------------------------------------------------------------ chat
def reply(engine: RemoteEngine, conversation, decode, stream: bool = True) -> Iterator[str]:
    """The answer's text pieces as the server streams them (api.chat.reply's remote twin)."""
    body = chat_body(engine, conversation, decode, stream=True)
    with engine.client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code >= 400:
            response.read()
            check(response)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise ServerError(f"server: {data['error'].get('message')}")
            for choice in data.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def reply_with_speech(engine: RemoteEngine, conversation, decode):
    """(text, 24 kHz float32 wav, rate) of a spoken answer (api.chat.reply_with_speech's remote twin)."""
    if conversation.voice is not None:
        raise UsageError("--voice with chat --speak is not supported with --server: the server's built-in "
                         "voice is used without it")
    body = chat_body(engine, conversation, decode, modalities=["text", "audio"],
                     audio={"voice": "alloy", "format": "wav"})
    message = engine.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    audio = message["audio"]
    return audio["transcript"], wav_samples(base64.b64decode(audio["data"])), OUTPUT_SAMPLE_RATE


def wav_samples(data: bytes) -> np.ndarray:
    """A PCM16 wav -> float samples that write_wav turns back into exactly the same PCM16 values."""
    import wave

    from minicpmo_cli.outputs import PCM16_MAX

    with wave.open(io.BytesIO(data)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / PCM16_MAX


# ------------------------------------------------------------------------------------------ speech
@dataclass
class RemoteSpeech:
    text: str
    wav: np.ndarray
    sample_rate: int = OUTPUT_SAMPLE_RATE
    capped: bool = False
    pieces: list = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.wav) / float(self.sample_rate)


def speak(engine: RemoteEngine, text: str, voice=None, *, decode=None, verbatim: bool = True,
          max_frames: int | None = None) -> RemoteSpeech:
    """api.speech.speak's remote twin: the speech of ``text`` as the server makes it."""
    from minicpmo_cli.units import FRAMES_PER_SECOND

    body: dict[str, Any] = {"model": engine.model, "input": text, "voice": "alloy", "response_format": "wav",
                            "verbatim": verbatim, "seed": common.options().seed}
    if voice is not None:
        body.update(mode=voice.mode, language=voice.language, instructions=voice.instruction)
        if voice.reference is not None:
            body["reference_audio"] = float_wav_b64(voice.reference)
    if max_frames is not None:
        body["max_audio_seconds"] = max_frames / FRAMES_PER_SECOND  # the server rounds back to these frames
    if decode is not None:
        body.update(max_new_tokens=decode.max_new_tokens, sampling=decode.sampling, temperature=decode.temperature,
                    top_p=decode.top_p, top_k=decode.top_k, repetition_penalty=decode.repetition_penalty)
    response = engine.post("/v1/audio/speech", json={k: v for k, v in body.items() if v is not None})
    return RemoteSpeech(text=text, wav=wav_samples(response.content),
                        capped=response.headers.get("x-speech-capped") == "1")


def speak_function(engine: Any):
    """api.speech.speak, or its remote twin for a server."""
    if is_remote(engine):
        return speak
    from minicpmo_cli.api.speech import speak as local_speak

    return local_speak


# ------------------------------------------------------------------------------------------ asr
def transcribe_many(engine: RemoteEngine, inputs, options, decode) -> Iterator[Any]:
    """api.asr.transcribe_many's remote twin: one TranscriptRecord per input, in order."""
    for item in inputs:
        yield _transcribe_one(engine, item, options, decode)


def _asr_form(engine: RemoteEngine, options, decode) -> dict:
    form = {"model": engine.model, "response_format": "verbose_json", "task": options.task,
            "language": None if options.language == "auto" else options.language, "prompt": options.prompt,
            "temperature": decode.temperature, "max_new_tokens": decode.max_new_tokens, "top_p": decode.top_p,
            "top_k": decode.top_k, "repetition_penalty": decode.repetition_penalty, "num_beams": decode.num_beams,
            "sampling": None if decode.sampling is None else str(decode.sampling).lower()}
    return {k: str(v) for k, v in form.items() if v is not None}


def _transcribe_one(engine: RemoteEngine, item, options, decode):
    from minicpmo_cli.api.asr import input_name
    from minicpmo_cli.outputs import Segment, TranscriptRecord

    record = TranscriptRecord(path=item.path)
    name = "stdin" if item.path == "-" else os.path.basename(item.path) or "audio"
    try:
        data = item.source if isinstance(item.source, bytes) else _read(item.path)
        response = engine.post("/v1/audio/transcriptions", data=_asr_form(engine, options, decode),
                               files={"file": (name, data)})
    except InputError as exc:
        record.error = _reason(str(exc), exc.path)
        return record
    except ServerError as exc:
        message = str(exc).removeprefix("server: ")
        if "cannot reach" in message:
            raise
        record.error = _reason(message, name)
        return record
    result = response.json()
    record.text, record.language, record.duration = result["text"], result.get("language"), result.get("duration")
    record.segments = [Segment(s["start"], s["end"], s["text"]) for s in result.get("segments", [])]
    common.debug(f"{input_name(item.path)}: transcribed by the server")
    return record


def _read(path: str) -> bytes:
    """The file's bytes; a file that cannot be read fails as the local decoder reports it."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        from minicpmo_cli.media.audio import load_audio

        load_audio(path)  # raises the local InputError (missing, a folder, unreadable)
        raise


def _reason(message: str, name: str | None) -> str:
    prefix = f"{name}: " if name else ""
    return message[len(prefix):] if prefix and message.startswith(prefix) else message
