"""One response of a live session: the answer job on the model's thread, its events as items arrive.

Events, in OpenAI's order: ``response.created``, ``response.output_item.added``, ``conversation.item.added``,
``response.content_part.added``, then per generated item ``response.output_audio.delta`` (pcm16 24 kHz,
base64) and ``response.output_audio_transcript.delta``, then the ``.done`` events and ``response.done`` with
``usage`` and this turn's ``latency`` (an extension: see :func:`minicpmo_cli.api.live.latency_summary`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING

from minicpmo_cli.api.live_model import pcm16_bytes
from minicpmo_cli.api.live_session_config import PCM_FORMAT
from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

if TYPE_CHECKING:
    from minicpmo_cli.api.live import LiveSession, Response

_DONE = object()


def _response_json(session: LiveSession, response: Response, status: str) -> dict:
    config = session.config
    return {"object": "realtime.response", "id": response.id, "status": status, "status_details": None,
            "output": [], "conversation_id": f"conv_{session.id[5:]}", "metadata": None, "usage": None,
            "output_modalities": ["audio"] if config.speak else ["text"],
            "max_output_tokens": "inf" if config.max_output_tokens is None else config.max_output_tokens,
            "audio": {"output": {"format": PCM_FORMAT, "voice": config.voice}}}


async def run_response(session: LiveSession, response: Response) -> None:
    """Start the answer job, stream its items out, finish with the done events."""
    from minicpmo_cli.api.live import _Either

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
        return session.model.answer(engine, _Either(cancel, response.stop), emit, decode=settings.decode,
                                    seed=seed, speak=speak)

    future = session.enqueue(job)
    future.add_done_callback(lambda _: response.queue.put_nowait(_DONE))
    await _stream_items(session, response, where, speak)
    stats = None if future.cancelled() or future.exception() is not None else future.result()
    await _finish(session, response, item, part, where, stats, failed=stats is None)


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
                  failed: bool) -> None:
    from minicpmo_cli.api.live import latency_summary

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
        body["status_details"] = {"type": "failed", "error": {"type": "server_error", "code": "model_error"}}
    if stats is not None:
        body["usage"] = {"total_tokens": stats.input_tokens + stats.output_tokens,
                         "input_tokens": stats.input_tokens, "output_tokens": stats.output_tokens,
                         "input_token_details": {"cached_tokens": 0}, "output_token_details": {}}
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
    from minicpmo_cli.generation.presets import DecodeOptions, resolve

    return resolve("omni-stream", DecodeOptions(max_new_tokens=session.config.max_output_tokens))
