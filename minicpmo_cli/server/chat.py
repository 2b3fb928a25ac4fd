"""POST /v1/chat/completions: text, image_url, input_audio and video_url parts in; text (and speech) out."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from minicpmo_cli.errors import describe_error
from minicpmo_cli.server import generation, media
from minicpmo_cli.server.errors import APIError, error_body
from minicpmo_cli.server.event_stream import EventStream
from minicpmo_cli.server.limits import chat_limits
from minicpmo_cli.server.schemas import ChatRequest, Message
from minicpmo_cli.server.voices import DEFAULT_VOICE, resolve_voice
from minicpmo_cli.server.worker import Pool
from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

router = APIRouter()
AUDIO_LIFETIME = 3600  # s: message.audio.expires_at (nothing is kept server-side; the field is OpenAI's)
PCM_CHUNK = OUTPUT_SAMPLE_RATE // 5 * 2  # bytes of pcm16 per streamed audio delta: 0.2 s of speech


# ------------------------------------------------------------------------------------------ request -> model
def _content_parts(message: Message) -> list[Any]:
    if message.content is None:
        return []
    return [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content


def _part(part: dict, where: str, limits: media.FetchLimits) -> tuple[list[Any], str]:
    """One content part -> (model parts, source type)."""
    kind = part.get("type")
    if kind == "text":
        return [str(part.get("text", ""))], "text"
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url", "")
        return [media.image_from_url(url, where, limits)], "image"
    if kind == "input_audio":
        data = (part.get("input_audio") or {}).get("data", "")
        return [media.decode_audio(media.b64decode(data, where), where, limits.max_audio_seconds)], "audio"
    if kind == "video_url":
        video = part.get("video_url") or {}
        sampling = {key: video[key] for key in ("fps", "max_frames") if key in video}
        return media.video_from_url(video.get("url", ""), where, limits, **sampling), "video"
    raise APIError(400, f"{where}: unsupported content part type {kind!r} "
                        "(text, image_url, input_audio, video_url)", param=where)


def conversation_for(body: ChatRequest, limits: media.FetchLimits):
    """The request's messages as a Conversation whose last turn is the user's question."""
    from minicpmo_cli.api.chat import Conversation, Turn, strip_placeholder_markers

    conversation = Conversation(language=body.language)
    systems: list[str] = []
    for index, message in enumerate(body.messages):
        turn = Turn("assistant" if message.role == "assistant" else "user")
        for number, part in enumerate(_content_parts(message)):
            where = f"messages[{index}].content[{number}]"
            if not isinstance(part, dict):
                raise APIError(400, f"{where}: a content part must be an object", param=where)
            parts, kind = _part(part, where, limits)
            if message.role in ("system", "developer"):
                if kind != "text":
                    raise APIError(400, f"{where}: a system message holds text only", param=where)
                systems.append(parts[0])
                continue
            if message.role == "assistant":
                parts = [strip_placeholder_markers(p) if isinstance(p, str) else p for p in parts]
            turn.parts.extend(parts)
            turn.sources.extend({"type": kind} for _ in parts)
            conversation.video_mode |= kind == "video"
        if message.role not in ("system", "developer"):
            conversation.turns.append(turn)
    if not conversation.turns or conversation.turns[-1].role != "user" or not conversation.turns[-1].parts:
        raise APIError(400, "the last message must be a user message with some content", param="messages")
    conversation.system = "\n".join(systems) or None
    return conversation


def text_only(body: ChatRequest) -> bool:
    """Whether every message holds text only (plain strings, or parts of type "text")."""
    return all(message.content is None or isinstance(message.content, str)
               or all(isinstance(part, dict) and part.get("type") == "text" for part in message.content)
               for message in body.messages)


def decode_options(body: ChatRequest):
    """OpenAI's sampling fields -> DecodeOptions. temperature 0 means deterministic: greedy (the argmax, no
    random draw), still streamed."""
    from minicpmo_cli.api.engine import REFERENCE_SAMPLING, DecodeOptions

    common = {"max_new_tokens": body.max_completion_tokens or body.max_tokens, "seed": body.seed,
              "repetition_penalty": body.repetition_penalty}
    if body.sampling is False:
        return DecodeOptions(sampling=False, num_beams=body.num_beams, **common)
    if body.temperature == 0:
        if body.repetition_penalty is None:  # the penalty the reference samples with (not its beams' 1.2)
            common["repetition_penalty"] = REFERENCE_SAMPLING["repetition_penalty"]
        return DecodeOptions(sampling=False, num_beams=1, **common)
    return DecodeOptions(sampling=True, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, **common)


def _check(body: ChatRequest) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "n must be 1: this server gives one answer per request", param="n")
    if body.audio is not None and not body.wants_audio:
        raise APIError(400, "audio output needs modalities [\"text\", \"audio\"]", param="modalities")


# ------------------------------------------------------------------------------------------ responses
def _completion(body: ChatRequest, text: str, finish: str, usage: dict, audio: dict | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text if audio is None else None}
    if audio is not None:
        message["audio"] = audio
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                              "logprobs": None}], "usage": usage}


class Chunks:
    """The chat.completion.chunk events of one stream (one id, one created time, as OpenAI's). A text delta,
    the event sent most, is its text's JSON between two strings made once per stream."""

    def __init__(self, ident: str, model: str) -> None:
        self.ident, self.model, self.created = ident, model, int(time.time())
        head, tail = self.chunk({"content": "\0"}).rsplit(json.dumps("\0"), 1)  # content comes last
        self._text_head, self._text_tail = head, tail

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}]
        data = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def text(self, content: str) -> str:
        return self._text_head + json.dumps(content, ensure_ascii=False) + self._text_tail


def _audio_object(wav, rate: int, fmt: str, transcript: str) -> dict:
    from minicpmo_cli.server.encode import encode

    return {"id": f"audio_{uuid.uuid4().hex}", "data": base64.b64encode(encode(wav, rate, fmt)).decode("ascii"),
            "expires_at": int(time.time()) + AUDIO_LIFETIME, "transcript": transcript}


class ChatEvents:
    """The events of one chat stream (server/event_stream.py), as OpenAI streams them: text pieces as content
    deltas, or for a spoken answer the transcript, then base64 pcm16 24 kHz audio deltas as the speech is
    synthesised; then the finish (and the usage, when asked for). The items of one send (what came since the
    last) are rendered together: their text pieces as one delta."""

    closing = "data: [DONE]\n\n"

    def __init__(self, body: ChatRequest) -> None:
        self.body, self.spoken = body, body.wants_audio
        self.chunks = Chunks(f"chatcmpl-{uuid.uuid4().hex}", body.model)
        self.audio_id = f"audio_{uuid.uuid4().hex}" if self.spoken else ""
        self.opening = self.chunks.chunk({"role": "assistant", "content": None if self.spoken else ""})

    def render(self, items: list) -> str:
        if not self.spoken and all(item[0] == "text" for item in items):  # the common case: a text delta
            return self.chunks.text("".join(item[1] for item in items)) if items else ""
        return "".join(chunk for item in merge_text(items)
                       for chunk in _item_chunks(item, self.chunks, self.audio_id, self.body))

    def failure(self, exc: BaseException) -> str:
        from minicpmo_cli.errors import MiniCPMOError

        message = str(exc) if isinstance(exc, (APIError, MiniCPMOError)) else f"internal error: {describe_error(exc)}"
        return f"data: {json.dumps(error_body(500, message))}\n\n"


def merge_text(items: list[tuple]) -> list[tuple]:
    """Consecutive ("text", piece) items as one (the text of one delta)."""
    merged: list[tuple] = []
    for item in items:
        if item[0] == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + item[1])
        else:
            merged.append(item)
    return merged


def _item_chunks(item: tuple, chunks: Chunks, audio_id: str, body: ChatRequest) -> list[str]:
    kind = item[0]
    if kind == "text" and not body.wants_audio:
        return [chunks.text(item[1])]
    if kind == "text":
        return [chunks.chunk({"audio": {"id": audio_id, "transcript": word}}) for word in _words(item[1])]
    if kind == "audio":
        from minicpmo_cli.server.encode import pcm16_bytes

        pcm = pcm16_bytes(item[1])
        return [chunks.chunk({"audio": {"id": audio_id, "data": base64.b64encode(
            pcm[start:start + PCM_CHUNK]).decode("ascii")}}) for start in range(0, len(pcm), PCM_CHUNK)]
    delta = {"audio": {"id": audio_id, "expires_at": int(time.time()) + AUDIO_LIFETIME}} if body.wants_audio else {}
    found = [chunks.chunk(delta, finish=item[2])]
    if body.stream_options and body.stream_options.include_usage:
        found.append(chunks.chunk({}, usage=item[1]))
    return found


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"\S+\s*|\s+", text)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------------------------------ the route
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = request.app.state.minicpmo
    timer = state.metrics.timer()
    state.check_model(body.model, "chat")
    _check(body)
    media_limits = chat_limits(body, state.settings.fetch, state.engine)  # a 400 before any decoding
    if text_only(body):  # nothing to fetch or decode: not worth a thread hop
        conversation = conversation_for(body, media_limits)
    else:
        conversation = await asyncio.to_thread(conversation_for, body, media_limits)  # fetches, decoding: off the loop
    decode = generation.with_default_seed(decode_options(body), state.settings.seed)
    from minicpmo_cli.api.chat import chat_settings

    chat_settings(conversation, decode)  # options that contradict each other are a 400 before any work
    pool = state.worker
    if body.wants_audio:
        if not state.settings.tts:
            raise APIError(400, "this server was started without the speech tower (--no-tts)", param="modalities")
        conversation.voice = resolve_voice(body.audio.voice if body.audio else DEFAULT_VOICE)
        if body.stream:
            return await _streamed(pool, generation.spoken_stream(conversation, decode, body.stops, timer), body,
                                   request)
        job = generation.spoken_answer(conversation, decode, body.stops, timer)
        text, wav, rate, usage, finish = await pool.run(job, disconnected=request.is_disconnected)
        fmt = body.audio.format if body.audio else "wav"
        audio = await asyncio.to_thread(_audio_object, wav, rate, fmt, text)  # encoding: off the loop
        return _completion(body, text, finish, usage, audio=audio)
    job = generation.text_answer(conversation, decode, body.stops, timer)
    if body.stream:
        return await _streamed(pool, job, body, request)
    collected = await pool.run(lambda engine, cancel: list(job(engine, cancel)), disconnected=request.is_disconnected)
    text = "".join(item[1] for item in collected if item[0] == "text")
    _, usage, finish = collected[-1]
    return _completion(body, text, finish, usage)


async def _streamed(pool: Pool, job: Any, body: ChatRequest, request: Request) -> EventStream:
    """The job's answer as events; its first items are awaited here, so that its errors still get their HTTP
    status (and a client that leaves before them cancels it)."""
    stream = pool.open_stream(job)
    try:
        first = await stream.first(request.is_disconnected)
    except BaseException:
        stream.close()
        raise
    return EventStream(stream, first, ChatEvents(body), headers=SSE_HEADERS)
