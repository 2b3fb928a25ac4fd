"""The CLI through a running `minicpmo serve` (--server URL / MINICPMO_SERVER): asr, chat (voices and videos
included), describe-video, tts and clone send their work there instead of loading the model, and write the
same outputs. mimick, omni and tts --stream have no route on the server: they say so in one line and run here.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from minicpmo_cli.cli import common
from minicpmo_cli.errors import EnvironmentProblem, InputError, MiniCPMOError, UsageError
from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

# Seconds, each overridable by its environment variable: reaching the server and its /health answer are
# quick or the server is down or hung; model work may queue behind other requests (a stream's next piece, a
# whole spoken answer), so its read timeout is long.
TIMEOUTS = {"connect": ("MINICPMO_SERVER_CONNECT_TIMEOUT", 5.0), "health": ("MINICPMO_SERVER_HEALTH_TIMEOUT", 10.0),
            "read": ("MINICPMO_SERVER_READ_TIMEOUT", 600.0)}


class ServerError(MiniCPMOError):
    """The server refused or failed a request, or could not be reached or understood (one line)."""


def timeout(kind: str) -> float:
    """The ``kind`` timeout in seconds (connect, health, read), from its environment variable if set."""
    name, default = TIMEOUTS[kind]
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{name} must be a number of seconds > 0, not {text!r}")
    return value


@dataclass
class RemoteEngine:
    """Stands where an Engine stands in the chat and speech commands; the work happens on the server."""

    url: str
    client: Any = None
    model: str = ""
    has_tts: bool = True
    remote: bool = True

    towers: dict = field(default_factory=lambda: {"vision": True, "audio": True, "tts": True})  # the server's

    def enable_tts(self) -> None:  # the server loads its speech tower itself
        pass

    def ensure_towers(self, vision: bool = False, audio: bool = False) -> list[str]:
        return []

    def post(self, path: str, **kwargs):
        with transport_errors(self.url, path):
            response = self.client.post(path, **kwargs)
        check(response)
        return response

    def malformed(self, path: str, problem: str) -> ServerError:
        return malformed(self.url, path, problem)


def malformed(url: str, path: str, problem: str) -> ServerError:
    return ServerError(f"the server at {url} sent a malformed answer to {path}: {problem}")


@contextmanager
def transport_errors(url: str, path: str, wait: str = "read"):
    """httpx's failures as one line naming the server, the route and what went wrong."""
    import httpx

    try:
        yield
    except httpx.ConnectTimeout:
        raise ServerError(f"cannot reach the server at {url}: no connection within {timeout('connect'):g} s "
                          f"({TIMEOUTS['connect'][0]})") from None
    except httpx.TimeoutException:
        raise ServerError(f"the server at {url} did not answer {path} within {timeout(wait):g} s "
                          f"({TIMEOUTS[wait][0]}); is it hung or overloaded?") from None
    except httpx.RemoteProtocolError as exc:
        raise malformed(url, path, f"not a valid HTTP answer ({_one_line(exc)})") from None
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach the server at {url} ({_one_line(exc)}); start one with: minicpmo serve") \
            from None


def _one_line(value: Any, limit: int = 200) -> str:
    return " ".join(str(value).split())[:limit]


def is_remote(engine: Any) -> bool:
    return bool(getattr(engine, "remote", False))


def check(response) -> None:
    """An error status as the server's own one-line message."""
    if response.status_code < 400:
        return
    code = None
    try:
        error_object = response.json()["error"]
        message, code = error_object["message"], error_object.get("code")
        if not isinstance(message, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        message = _one_line(response.text) or response.reason_phrase
        message = f"HTTP {response.status_code} from {response.url.path}: {message}"
    # A request the server's schema refuses is a bad option here (exit 2), as the same value is locally.
    schema_refusal = response.status_code == 422 or (response.status_code == 400 and code == "invalid_schema")
    error = UsageError if schema_refusal else ServerError
    if response.status_code == 400 and _too_long(message):
        from minicpmo_cli.processing.limits import PromptTooLong

        error = PromptTooLong  # exit 2, as the same prompt gives locally; the REPL makes room and asks again
    raise error(f"server: {_one_line(message, 500)}")


def _too_long(message: str) -> bool:
    return "tokens, but the model reads at most" in message or "maximum context length" in message


def json_answer(response, path: str, url: str) -> dict:
    """The JSON object a route answered with (a malformed-answer error otherwise)."""
    try:
        data = response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise malformed(url, path, f"expected JSON, got {kind}: {_one_line(response.text, 80)!r}") from None
    if not isinstance(data, dict):
        raise malformed(url, path, f"expected a JSON object, got {type(data).__name__}")
    return data


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
    limits = httpx.Timeout(timeout("read"), connect=timeout("connect"))
    client = httpx.Client(base_url=url, timeout=limits, headers={"Authorization": f"Bearer {key}"} if key else {})
    with transport_errors(url, "/health", wait="health"):
        health = client.get("/health", timeout=httpx.Timeout(timeout("health"), connect=timeout("connect")))
    check(health)
    model = json_answer(health, "/health", url).get("model", "")
    engine = RemoteEngine(url=url, client=client, model=model if isinstance(model, str) else "")
    common.debug(f"using the server at {url} (model {engine.model})")
    return engine


def engine_or_load(**towers) -> Any:
    """The server when --server is given, else the model loaded here."""
    return connect() if common.options().server else common.load_engine(**towers)


def runs_locally(command: str, why: str) -> None:
    """With --server set: say in one line that ``command`` runs on this machine (and loads the model)."""
    if common.options().server:
        common.warn(f"{command} runs on this machine, not on --server {common.options().server}: {why}")


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


def video_part(path: str, fps: float | None = None, max_frames: int | None = None) -> dict:
    """A video file as a video_url part: the server samples it as `chat --video` does (1 fps, at most 64
    frames, its sound), or at ``fps`` / up to ``max_frames`` (the part's extension fields) when given."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror or exc})", path) from None
    video = {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}
    video.update({key: value for key, value in (("fps", fps), ("max_frames", max_frames)) if value is not None})
    return {"type": "video_url", "video_url": video}


def _turn_parts(turn) -> list[dict]:
    """A turn's parts as content parts; an attached video goes as the file (its frames and sound are parts
    here, but the server must know they are a video to use the guide's video settings)."""
    out: list[dict] = []
    parts = list(turn.parts)
    for source in turn.sources:
        if source.get("type") == "video":
            taken = int(source.get("frames", 0)) + (1 if source.get("audio") else 0)
            del parts[:taken]
            out.append(video_part(source["path"]))
        else:
            out += _parts(parts[:1])
            del parts[:1]
    return out + _parts(parts)


def chat_messages(conversation) -> list[dict]:
    """The conversation as the model will see it: the voice prompt (mode and reference clip) or --system
    first, then the turns, so the server builds exactly the local prompt."""
    messages = [{"role": m["role"], "content": _parts(m["content"])} for m in conversation.system_messages()]
    return messages + [{"role": t.role, "content": _turn_parts(t)} for t in conversation.turns]


def chat_body(engine: RemoteEngine, conversation, decode, **extra) -> dict:
    return request_body(engine, chat_messages(conversation), conversation.language, decode, **extra)


def request_body(engine: RemoteEngine, messages: list[dict], language: str, decode, **extra) -> dict:
    body = {"model": engine.model, "messages": messages, "language": language,
            "max_tokens": decode.max_new_tokens, "temperature": decode.temperature, "top_p": decode.top_p,
            "top_k": decode.top_k, "repetition_penalty": decode.repetition_penalty, "num_beams": decode.num_beams,
            "sampling": decode.sampling, "seed": common.options().seed, **extra}
    if decode.min_new_tokens:
        common.warn("--min-new-tokens is not sent to the server: it is ignored with --server")
    return {k: v for k, v in body.items() if v is not None}


# ------------------------------------------------------------------------------------------ chat
CHAT = "/v1/chat/completions"


def reply(engine: RemoteEngine, conversation, decode, stream: bool = True) -> Iterator[str]:
    """The answer's text pieces as the server streams them (api.chat.reply's remote twin)."""
    return stream_answer(engine, chat_body(engine, conversation, decode, stream=True))


def describe_video_stream(engine: RemoteEngine, path, prompt: str | None, decode, fps: float | None = None,
                          max_frames: int | None = None) -> Iterator[str]:
    """api.video.describe_video_stream's remote twin: the server samples the video (1 frame a second, at most
    64, unless ``fps`` / ``max_frames`` are given)."""
    from minicpmo_cli.api.video import DEFAULT_VIDEO_PROMPT

    content = [video_part(str(path), fps, max_frames), {"type": "text", "text": prompt or DEFAULT_VIDEO_PROMPT}]
    return stream_answer(engine, request_body(engine, [{"role": "user", "content": content}], "en", decode,
                                              stream=True))


def stream_answer(engine: RemoteEngine, body: dict) -> Iterator[str]:
    """The text pieces of a streamed chat completion. Anything but a stream of chat.completion.chunk events
    ending in [DONE] is a malformed answer, never an empty one."""
    with transport_errors(engine.url, CHAT):
        with engine.client.stream("POST", CHAT, json=body) as response:
            if response.status_code >= 400:
                response.read()
                check(response)
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                response.read()
                raise engine.malformed(CHAT, f"expected a stream of completion chunks (text/event-stream), got "
                                             f"{kind or 'no content type'}: {_one_line(response.text, 80)!r}")
            done = False
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                yield from _chunk_text(engine, payload)
    if not done:
        raise engine.malformed(CHAT, "the stream ended before its [DONE] event (the answer may be cut short)")


def _chunk_text(engine: RemoteEngine, payload: str) -> list[str]:
    """The text pieces of one chat.completion.chunk event."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise engine.malformed(CHAT, f"an event that is not JSON: {_one_line(payload, 80)!r}") from None
    if not isinstance(data, dict):
        raise engine.malformed(CHAT, f"an event that is not a JSON object: {_one_line(payload, 80)!r}")
    if "error" in data:
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise ServerError(f"server: {_one_line(message, 500)}")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise engine.malformed(CHAT, f"an event without choices: {_one_line(payload, 80)!r}")
    pieces = []
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        piece = delta.get("content") if isinstance(delta, dict) else None
        if delta is None or not isinstance(piece, (str, type(None))):
            raise engine.malformed(CHAT, f"a choice without a text delta: {_one_line(choice, 80)!r}")
        if piece:
            pieces.append(piece)
    return pieces


def reply_with_speech(engine: RemoteEngine, conversation, decode):
    """(text, 24 kHz float32 wav, rate) of a spoken answer (api.chat.reply_with_speech's remote twin)."""
    body = chat_body(engine, conversation, decode, modalities=["text", "audio"],
                     audio={"voice": "alloy", "format": "wav"})
    data = json_answer(engine.post(CHAT, json=body), CHAT, engine.url)
    try:
        audio = data["choices"][0]["message"]["audio"]
        transcript, encoded = audio["transcript"], audio["data"]
        if not isinstance(transcript, str) or not isinstance(encoded, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise engine.malformed(CHAT, "expected a chat.completion whose message has audio (transcript and data), "
                                     f"got {_one_line(json.dumps(data), 80)!r}") from None
    try:
        wav = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise engine.malformed(CHAT, "the answer's audio data is not base64") from None
    return transcript, wav_samples(wav, engine, CHAT), OUTPUT_SAMPLE_RATE


def wav_samples(data: bytes, engine: RemoteEngine | None = None, path: str = "") -> np.ndarray:
    """A PCM16 wav -> float samples that write_wav turns back into exactly the same PCM16 values."""
    import wave

    from minicpmo_cli.outputs import PCM16_MAX

    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                raise wave.Error(f"{wav.getnchannels()} channel(s) of {8 * wav.getsampwidth()}-bit samples, "
                                 "not mono 16-bit")
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    except (wave.Error, EOFError, ValueError) as exc:
        if engine is None:
            raise
        raise engine.malformed(path, f"expected a mono 16-bit wav, got {len(data)} bytes that are not one "
                                     f"({_one_line(exc, 80)})") from None
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
    return RemoteSpeech(text=text, wav=wav_samples(response.content, engine, "/v1/audio/speech"),
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
        if not str(exc).startswith("server: "):  # unreachable, hung, or not understood: no input can be done
            raise
        record.error = _reason(str(exc).removeprefix("server: "), name)
        return record
    path = "/v1/audio/transcriptions"
    result = json_answer(response, path, engine.url)
    try:
        record.text, record.language, record.duration = result["text"], result.get("language"), result.get("duration")
        record.segments = [Segment(float(s["start"]), float(s["end"]), s["text"]) for s in result.get("segments", [])]
        if not isinstance(record.text, str) or not all(isinstance(s.text, str) for s in record.segments):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise engine.malformed(path, "expected a verbose_json transcription (text, segments), got "
                                     f"{_one_line(json.dumps(result), 80)!r}") from None
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
