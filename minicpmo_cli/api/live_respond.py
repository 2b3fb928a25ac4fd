"""One response of a live session: the answer job on the model's thread, its events as items arrive.

Events, in OpenAI's order: ``response.created``, ``response.output_item.added``, ``conversation.item.added``,
``response.content_part.added``, then per generated item ``response.output_audio.delta`` (pcm16 24 kHz,
base64) and ``response.output_audio_transcript.delta``, then the ``.done`` events and ``response.done`` with
``usage``, this turn's ``latency`` (an extension: see :func:`latency_summary`) and ``context`` (an
extension: ``tokens`` in the model's cache after the answer, its ``max_tokens``, and ``dropped_item_ids``,
the items the conversation forgot since the last answer because it outgrew the context). OpenAI sends no
event when truncation drops items (they leave the model's context, not the conversation), and neither does
this server; the dropped items are no longer kept here either (``conversation.item.truncate`` on one of them
answers ``item_not_found``), so a session's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from minicpmo_cli.api.live_model import pcm16_bytes
from minicpmo_cli.api.live_session_config import PCM_FORMAT
from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

# The session (api/live.py LiveSession) drives this module; it is typed loosely here so that this module,
# which the session imports, does not import it back.
LiveSession = Any

_DONE = object()

@dataclass
class Response:
    id: str
    item_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    reason: str | None = None  # why it was stopped: turn_detected | client_cancelled
    audio_samples: int = 0  # 24 kHz samples sent
    transcript: str = ""
    speech_ended_at: float | None = None
    first_audio_at: float | None = None
    prefill_ms: list[float] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)

class EitherEvent:
    """A cancel flag set when either of two events is."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)

def latency_summary(response: Response, vad_silence_ms: int | None) -> dict:
    """This turn's latencies for response.done (ms; None where it does not apply). The VAD's silence
    window (how long it waits before ending a turn) comes before ``speech_end_to_first_audio_ms``."""
    first = response.first_audio_at
    ended = response.speech_ended_at
    costs = response.prefill_ms
    return {
        "speech_end_to_first_audio_ms": None if (first is None or ended is None) else round((first - ended) * 1000, 1),
        "vad_silence_ms": vad_silence_ms if ended is not None else None,
        "response_to_first_audio_ms": None if first is None else round((first - response.created_at) * 1000, 1),
        "prefill_units": len(costs),
        "prefill_ms_per_unit_median": round(statistics.median(costs), 1) if costs else None,
        "prefill_ms_per_unit_max": round(max(costs), 1) if costs else None,
    }


def _response_json(session: LiveSession, response: Response, status: str) -> dict:
    config = session.config
    return {"object": "realtime.response", "id": response.id, "status": status, "status_details": None,
            "output": [], "conversation_id": f"conv_{session.id[5:]}", "metadata": None, "usage": None,
            "output_modalities": ["audio"] if config.speak else ["text"],
            "max_output_tokens": "inf" if config.max_output_tokens is None else config.max_output_tokens,
            "audio": {"output": {"format": PCM_FORMAT, "voice": config.voice}}}


async def run_response(session: LiveSession, response: Response) -> None:
    """Start the answer job, stream its items out, finish with the done events."""
    speak = session.config.speak
    previous, session.last_item_id = session.last_item_id, response.item_id
    item = {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": "in_progress", "content": []}
    session.items[response.item_id] = item
    where = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
    await session.send({"type": "response.created", "response": _response_json(session, response, "in_progress")})
    await session.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                        "item": item})
    await session.send({"type": "conversation.item.added", "item": item, "previous_item_id": previous})
    part = {"type": "audio", "transcript": ""} if speak else {"type": "text", "text": ""}
    await session.send({"type": "response.content_part.added", **where, "part": part})

    loop = asyncio.get_running_loop()
    settings = _settings(session)
    seed = None if session.config.seed is None else session.config.seed + session.answers

    def emit(text, audio) -> None:
        loop.call_soon_threadsafe(response.queue.put_nowait, (text, audio))

    def job(engine, cancel):
        return session.model.answer(engine, EitherEvent(cancel, response.stop), emit, decode=settings.decode,
                                    seed=seed, speak=speak, item_id=response.item_id)

    future = session.enqueue(job)
    future.add_done_callback(lambda _: response.queue.put_nowait(_DONE))
    await _stream_items(session, response, where, speak)
    error = None if future.cancelled() else future.exception()
    stats = None if future.cancelled() or error is not None else future.result()
    await _finish(session, response, item, part, where, stats, failed=stats is None, error=error)


async def _stream_items(session: LiveSession, response: Response, where: dict, speak: bool) -> None:
    while True:
        got = await response.queue.get()
        if got is _DONE:
            return
        text, audio = got
        if len(audio):
            if response.first_audio_at is None:
                response.first_audio_at = time.monotonic()
            await session.send({"type": "response.output_audio.delta", **where,
                                "delta": base64.b64encode(pcm16_bytes(audio)).decode("ascii")})
            response.audio_samples += len(audio)
        if text:
            kind = "response.output_audio_transcript.delta" if speak else "response.output_text.delta"
            await session.send({"type": kind, **where, "delta": text})
            response.transcript += text


async def _finish(session: LiveSession, response: Response, item: dict, part: dict, where: dict, stats,
                  failed: bool, error: BaseException | None = None) -> None:
    speak = session.config.speak
    stopped = stats is not None and stats.cancelled
    if speak:
        part["transcript"] = response.transcript
        await session.send({"type": "response.output_audio.done", **where})
        await session.send({"type": "response.output_audio_transcript.done", **where,
                            "transcript": response.transcript})
    else:
        part["text"] = response.transcript
        await session.send({"type": "response.output_text.done", **where, "text": response.transcript})
    item["content"] = [{"type": "output_audio" if speak else "output_text", **{k: v for k, v in part.items()
                                                                             if k != "type"}}]
    item["status"] = "incomplete" if (stopped or failed) else "completed"
    session.audio_ms[response.item_id] = int(round(response.audio_samples * 1000 / OUTPUT_SAMPLE_RATE))
    await session.send({"type": "response.content_part.done", **where, "part": part})
    await session.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                        "item": item})
    await session.send({"type": "conversation.item.done", "item": item, "previous_item_id": None})
    status = "failed" if failed else ("cancelled" if stopped else "completed")
    body = _response_json(session, response, status)
    body["output"] = [item]
    if stopped:
        body["status_details"] = {"type": "cancelled", "reason": response.reason or "client_cancelled"}
    elif failed:
        body["status_details"] = {"type": "failed", "error": {"type": getattr(error, "event_kind", "server_error"),
                                                              "code": getattr(error, "event_code", "model_error")}}
    if stats is not None:
        body["usage"] = {"total_tokens": stats.input_tokens + stats.output_tokens,
                         "input_tokens": stats.input_tokens, "output_tokens": stats.output_tokens,
                         "input_token_details": {"cached_tokens": 0}, "output_token_details": {}}
        body["context"] = {"tokens": stats.context_tokens, "max_tokens": stats.context_limit,
                           "dropped_item_ids": list(stats.dropped_item_ids)}
        for dropped in stats.dropped_item_ids:
            session.items.pop(dropped, None)
            session.audio_ms.pop(dropped, None)
    vad = session.config.turn_detection
    body["latency"] = latency_summary(response, None if vad is None else vad.silence_duration_ms)
    if stats is not None:
        first = stats.first_item_ms
        body["latency"]["first_item_compute_ms"] = None if first is None else round(first, 1)
    session.response = None
    session.answers += 1
    session._last_answer_item = response.item_id
    await session.send({"type": "response.done", "response": body})
    session.transcribe_waiting()


def _settings(session: LiveSession):
    return _resolve(session.config)


def _resolve(config):
    from minicpmo_cli.generation.presets import DecodeOptions, resolve

    return resolve("omni-stream", DecodeOptions(max_new_tokens=config.max_output_tokens))


def answer_tokens(config) -> int:
    """The longest answer a session's config allows (the room its conversation keeps free for it)."""
    return _resolve(config).decode.max_new_tokens
