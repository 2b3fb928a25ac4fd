"""A live conversation in OpenAI's Realtime protocol (GA event names): client events in, server events out.

:class:`LiveSession` is the conversation logic below the websocket (server/realtime.py only frames events):
it takes client events as dicts and sends server events as dicts through ``send``. The model work goes
through ``run_model(fn)`` (``fn(engine, cancel)`` run where the model may run: the server's worker, or a
local lock for ``minicpmo live``), one job at a time per session, in order.

What happens live: incoming 24 kHz pcm16 is resampled to 16 kHz as one stream and fed to a streaming VAD of
this connection's own. While the user speaks, every full second of the turn is prefilled at once as one of
the model's omni units (with the latest camera frame from ``input_image`` items), so when the VAD ends the
turn only the last partial second and the generation are left. Speech that starts during an answer stops it
(``interrupt_response``): the answer's item keeps what was sent and the model's cache is cut back to it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from minicpmo_cli.api.live_buffer import AudioBuffer
from minicpmo_cli.api.live_items import b64_field as _b64
from minicpmo_cli.api.live_model import UNIT_SAMPLES, LiveModel, InputResampler, pcm16_bytes, pcm16_samples
from minicpmo_cli.api.live_respond import Response, answer_tokens, latency_summary
from minicpmo_cli.api.live_session_config import LiveError, SessionConfig
from minicpmo_cli.units import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

logger = logging.getLogger(__name__)

RunModel = Callable[[Callable[[Any, threading.Event], Any]], Awaitable[Any]]
Send = Callable[[dict], Awaitable[None]]
MAX_TURN_SECONDS = 120  # a turn that long is ended by the server (its audio is kept for the transcript)
MAX_MANUAL_SECONDS = 15 * 60  # audio a manual buffer may hold before commit
_DONE = object()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def ms(samples: int, rate: int = INPUT_SAMPLE_RATE) -> int:
    return int(round(samples * 1000 / rate))


@dataclass
class Turn:
    """The user's turn in progress (VAD mode: from speech start; manual: the buffer)."""

    item_id: str
    start: int  # stream position of its first sample (prefix padding included)
    next_unit: int  # where the next unit to prefill starts
    prefill_ms: list[float] = field(default_factory=list)  # compute per prefilled unit
    ended_at: float | None = None  # monotonic time the VAD ended it






class LiveSession:
    def __init__(self, run_model: RunModel, send: Send, *, model: str,
                 resolve_voice: Callable[[str], np.ndarray | None] = lambda name: None,
                 seed: int | None = None, make_vad: Callable[..., Any] | None = None,
                 prefill_while_speaking: bool = True) -> None:
        self.run_model, self._send, self.resolve_voice = run_model, send, resolve_voice
        self.id = new_id("sess")
        self.config = SessionConfig(model=model, seed=seed)
        self.model = LiveModel(answer_tokens=answer_tokens(self.config))
        self.buffer = AudioBuffer()
        self.resampler = InputResampler()
        self._make_vad = make_vad
        self.prefill_while_speaking = prefill_while_speaking  # False: the turn-based baseline (benchmarks)
        self.vad = None
        self.turn: Turn | None = None
        self.response: Response | None = None
        self._response_task: asyncio.Task | None = None
        self.items: dict[str, dict] = {}
        self.last_item_id: str | None = None
        self.frame = None  # the latest camera frame not yet given to the model
        self.answers = 0
        self._jobs: asyncio.Queue = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_answer_end = 0  # cache length after the last answer (input token counts)
        self._last_answer_item: str | None = None  # the assistant item whose tokens end the cache
        self._transcripts: list = []  # (user item, previous id, 16 kHz audio) waiting for their transcript
        self._pending_costs: list[float] | None = None  # unit costs of a manual commit, for its response
        self.audio_ms: dict[str, int] = {}  # assistant item -> ms of audio sent

    # ------------------------------------------------------------------------------------------ plumbing
    async def send(self, event: dict) -> None:
        await self._send({"event_id": new_id("event"), **event})

    async def error(self, message: str, *, code: str | None = None, param: str | None = None,
                    event_id: str | None = None, kind: str = "invalid_request_error") -> None:
        await self.send({"type": "error", "error": {"type": kind, "code": code, "message": message,
                                                    "param": param, "event_id": event_id}})

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def enqueue(self, fn: Callable[[Any, threading.Event], Any]) -> asyncio.Future:
        """Run ``fn(engine, cancel)`` after this session's earlier jobs; its future result."""
        future = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((fn, future))
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run_jobs())
        return future

    async def _run_jobs(self) -> None:
        while True:
            fn, future = await self._jobs.get()
            try:
                result = await self.run_model(fn)
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - a failed job is reported to the client, the session goes on
                logger.warning("live job failed: %s", exc, exc_info=not hasattr(exc, "message"))
                await self.error(getattr(exc, "message", None) or str(exc),
                                 code=getattr(exc, "event_code", "model_error"),
                                 kind=getattr(exc, "event_kind", "server_error"))
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(result)

    async def start(self) -> None:
        await self.send({"type": "session.created", "session": self.config.to_json(self.id)})

    async def close(self) -> None:
        if self.response is not None:
            self.response.stop.set()
        for task in list(self._tasks) + ([self._runner] if self._runner else []):
            task.cancel()
        self.vad = None

    # ------------------------------------------------------------------------------------------ dispatch
    async def handle(self, event: Any) -> None:
        """One client event; a mistake in it is answered with an ``error`` event and the session goes on."""
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("an event must be a JSON object with a string 'type'", code="invalid_event",
                             param="type")
            return
        handler = _HANDLERS.get(event["type"])
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        if handler is None:
            await self.error(f"unknown or unsupported event type {event['type']!r}", code="invalid_event_type",
                             param="type", event_id=event_id)
            return
        try:
            await handler(self, event)
        except LiveError as exc:
            await self.error(exc.message, code=exc.code, param=exc.param, event_id=event_id)

    async def _session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise LiveError("session.update needs a 'session' object", "invalid_value", "session")
        updated = self.config.updated(session)
        if updated.voice != self.config.voice or updated.instructions != self.config.instructions:
            if self.model.started:
                raise LiveError("voice and instructions can change only before the conversation's first "
                                "input (the model has already read them)", "session_started", "session")
            self.model.ref_audio = self.resolve_voice(updated.voice)
            self.model.instructions = updated.instructions
        self.config = updated
        self.model.truncation = updated.truncation
        self.model.answer_tokens = answer_tokens(updated)
        await self._configure_vad()
        await self.send({"type": "session.updated", "session": self.config.to_json(self.id)})

    async def _configure_vad(self) -> None:
        vad = self.config.turn_detection
        if vad is None:
            return
        if self.vad is None:
            from minicpmo_cli.media.vad_stream import StreamingVAD

            maker = self._make_vad or StreamingVAD
            self.vad = await asyncio.to_thread(maker, vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms)
            self.vad.position = self.buffer.end
        else:
            self.vad.configure(vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms)

    # ------------------------------------------------------------------------------------------ audio in
    async def _append(self, event: dict) -> None:
        samples = pcm16_samples(_b64(event.get("audio"), "audio"))
        audio16 = self.resampler.feed(samples)
        self.buffer.append(audio16)
        if self.config.turn_detection is None:
            if self.buffer.size > MAX_MANUAL_SECONDS * INPUT_SAMPLE_RATE:
                self.buffer.drop_before(self.buffer.end - MAX_MANUAL_SECONDS * INPUT_SAMPLE_RATE)
                raise LiveError(f"the input buffer holds over {MAX_MANUAL_SECONDS} s: commit or clear it",
                                "input_audio_buffer_full", "audio")
            return
        if self.vad is None:
            await self._configure_vad()
        for vad_event in await asyncio.to_thread(self.vad.feed, audio16):
            if vad_event.kind == "start":
                await self._speech_started(vad_event.sample)
            else:
                await self._speech_stopped(vad_event.sample)
        if self.turn is not None:
            if self.prefill_while_speaking:
                self._prefill_ready_units()
            if self.buffer.end - self.turn.start > MAX_TURN_SECONDS * INPUT_SAMPLE_RATE:
                self.vad.reset()
                await self._speech_stopped(self.buffer.end)
        else:
            keep = (self.config.turn_detection.prefix_padding_ms * INPUT_SAMPLE_RATE) // 1000 + 1024
            self.buffer.drop_before(self.buffer.end - keep)

    async def _speech_started(self, sample: int) -> None:
        if self.response is not None and self.config.turn_detection.interrupt_response:
            self.response.reason = "turn_detected"
            self.response.stop.set()
        start = max(sample, self.buffer.base)
        self.turn = Turn(item_id=new_id("item"), start=start, next_unit=start)
        await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms(start),
                         "item_id": self.turn.item_id})

    def _prefill_ready_units(self, until: int | None = None) -> None:
        """Prefill each whole second of the turn that has arrived (and, with ``until``, the rest up to it)."""
        turn = self.turn
        end = self.buffer.end if until is None else until
        while end - turn.next_unit >= UNIT_SAMPLES or (until is not None and end > turn.next_unit):
            stop = min(end, turn.next_unit + UNIT_SAMPLES)
            self._prefill_unit(self.buffer.slice(turn.next_unit, stop), turn.prefill_ms, turn.item_id)
            turn.next_unit = stop

    def _prefill_unit(self, audio: np.ndarray, costs: list[float], item_id: str) -> asyncio.Future:
        frame, self.frame = self.frame, None
        return self.enqueue(lambda engine, cancel: costs.append(self.model.prefill_unit(engine, audio, frame,
                                                                                        item_id=item_id)))

    async def _speech_stopped(self, sample: int) -> None:
        turn = self.turn
        if turn is None:
            return
        turn.ended_at = time.monotonic()
        end = max(sample, turn.start + 1)
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms(end),
                         "item_id": turn.item_id})
        self._prefill_ready_units(until=end)
        await self._commit_turn(turn, self.buffer.slice(turn.start, end))
        self.buffer.drop_before(end)
        if self.config.turn_detection.create_response:
            await self._create_response(turn)
        else:
            self.transcribe_waiting()

    async def _commit_turn(self, turn: Turn, audio: np.ndarray) -> None:
        """Emit committed + the user item; its transcript follows when the model has answered."""
        self.turn = None
        previous, self.last_item_id = self.last_item_id, turn.item_id
        await self.send({"type": "input_audio_buffer.committed", "item_id": turn.item_id,
                         "previous_item_id": previous})
        item = {"id": turn.item_id, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
        self.items[turn.item_id] = item
        await self.send({"type": "conversation.item.added", "item": item, "previous_item_id": previous})
        self._transcripts.append((item, previous, audio))

    async def _commit(self, event: dict) -> None:
        if self.config.turn_detection is not None:
            if self.turn is None:
                raise LiveError("no speech to commit: the VAD has not heard a turn start",
                                "input_audio_buffer_commit_empty", None)
            await self._speech_stopped(self.buffer.end)
            return
        self.transcribe_waiting()  # an earlier commit that got no response.create: its transcript now
        if self.buffer.size == 0:
            raise LiveError("the input audio buffer is empty: append audio before committing",
                            "input_audio_buffer_commit_empty", None)
        turn = Turn(item_id=new_id("item"), start=self.buffer.base, next_unit=self.buffer.base)
        self.turn = turn
        self._prefill_ready_units(until=self.buffer.end)
        self._pending_costs = turn.prefill_ms
        await self._commit_turn(turn, self.buffer.slice(turn.start, self.buffer.end))
        self.buffer.clear()

    async def _clear(self, event: dict) -> None:
        if self.turn is not None:
            self.turn = None
            if self.vad is not None:
                self.vad.reset()
            # Units of the dropped turn may be prefilled already: a later turn starts after them.
        self.buffer.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------------------------------------ items
    async def _item_create(self, event: dict) -> None:
        from minicpmo_cli.api.live_items import user_parts

        item = event.get("item")
        if not isinstance(item, dict):
            raise LiveError("conversation.item.create needs an 'item' object", "invalid_value", "item")
        parts, frame_only = user_parts(item)
        item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
        previous, self.last_item_id = self.last_item_id, item_id
        if frame_only:
            self.frame = parts[-1]  # the camera: the next unit carries it
        else:
            self._prefill_parts(parts, item_id)
        content = [_echo_part(part) for part in item.get("content", [])]
        stored = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                  "status": "completed", "content": content}
        self.items[item_id] = stored
        await self.send({"type": "conversation.item.added", "item": stored, "previous_item_id": previous})
        await self.send({"type": "conversation.item.done", "item": stored, "previous_item_id": previous})

    def _prefill_parts(self, parts: list[Any], item_id: str) -> None:
        """Text and images in one prefill; audio in 1 s units (the first carries the item's image)."""
        images = [p for p in parts if not isinstance(p, (str, np.ndarray))]
        audios = [p for p in parts if isinstance(p, np.ndarray)]
        texts = [p for p in parts if isinstance(p, str)]
        if images:
            self.frame = images[-1]
        for audio in audios:
            for start in range(0, len(audio), UNIT_SAMPLES):
                self._prefill_unit(audio[start:start + UNIT_SAMPLES], [], item_id)
        if texts or self.frame is not None:
            frame, self.frame = self.frame, None
            content = ([frame] if frame is not None else []) + ["\n".join(texts)] if texts else [frame]
            self.enqueue(lambda engine, cancel: self.model.prefill(engine, content, item_id))

    async def _item_delete(self, event: dict) -> None:
        """Take an item out of the conversation and the model's context (its cache is rebuilt from there)."""
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.items:
            raise LiveError(f"no item {item_id!r} in the conversation", "item_not_found", "item_id")
        if (self.response is not None and self.response.item_id == item_id) or \
                (self.turn is not None and self.turn.item_id == item_id):
            raise LiveError(f"item {item_id!r} is still in progress (an answer being made or a turn being "
                            "spoken): wait for it to be done", "item_in_progress", "item_id")
        del self.items[item_id]
        self.audio_ms.pop(item_id, None)
        if self._last_answer_item == item_id:
            self._last_answer_item = None
        future = self.enqueue(lambda engine, cancel: self.model.delete_item(engine, item_id))
        self._spawn(self._deleted(future, item_id))

    async def _deleted(self, future: asyncio.Future, item_id: str) -> None:
        try:
            await future
        except Exception:  # noqa: BLE001 - the job runner has sent the error event
            return
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def _truncate(self, event: dict) -> None:
        item_id = event.get("item_id")
        item = self.items.get(item_id) if isinstance(item_id, str) else None
        if item is None or item.get("role") != "assistant":
            raise LiveError(f"no assistant item {item_id!r} to truncate", "item_not_found", "item_id")
        end_ms = event.get("audio_end_ms")
        total_ms = self.audio_ms.get(item_id, 0)
        if not isinstance(end_ms, int) or end_ms < 0 or end_ms > total_ms:
            raise LiveError(f"audio_end_ms must be an integer between 0 and {total_ms} (the audio sent)",
                            "invalid_value", "audio_end_ms")
        part = item["content"][0]
        transcript = part.get("transcript") or ""
        kept = transcript[: int(round(len(transcript) * end_ms / total_ms))] if total_ms else ""
        part["transcript"] = kept
        if self.model.generation_start is not None and item_id == self._last_answer_item:
            self.enqueue(lambda engine, cancel: self.model.crop_answer(engine, kept))
        await self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                         "audio_end_ms": end_ms})

    # ------------------------------------------------------------------------------------------ responses
    async def _response_create(self, event: dict) -> None:
        """Answer what the conversation holds (uncommitted audio stays in the buffer, as OpenAI does)."""
        await self._create_response(None)

    async def _response_cancel(self, event: dict) -> None:
        if self.response is None:
            raise LiveError("there is no response in progress to cancel", "response_cancel_not_active", None)
        self.response.reason = "client_cancelled"
        self.response.stop.set()

    async def _create_response(self, turn: Turn | None) -> None:
        from minicpmo_cli.api.live_respond import run_response

        if self.response is not None:
            if turn is None:
                raise LiveError("a response is already in progress: wait for response.done or cancel it",
                                "conversation_already_has_active_response", None)
            # A turn ended while the last answer is still stopping (barge-in) or speaking: answer it next.
            self._spawn(self._respond_after(self._response_task, turn))
            return
        response = Response(id=new_id("resp"), item_id=new_id("item"))
        if turn is not None:
            response.speech_ended_at, response.prefill_ms = turn.ended_at, turn.prefill_ms
        elif self._pending_costs is not None:
            response.prefill_ms, self._pending_costs = self._pending_costs, None
        self.response = response
        self._response_task = self._spawn(run_response(self, response))

    async def _respond_after(self, task: asyncio.Task | None, turn: Turn) -> None:
        if task is not None:
            await asyncio.wait({task})
        await self._create_response(turn)

    def transcribe_waiting(self) -> None:
        """Transcribe the committed user turns (after the answer, so they never delay it)."""
        waiting, self._transcripts = self._transcripts, []
        for item, previous, audio in waiting:
            self._spawn(self._transcribe(item, previous, audio))

    async def _transcribe(self, item: dict, previous: str | None, audio: np.ndarray) -> None:
        future = self.enqueue(lambda engine, cancel: self.model.transcribe(engine, audio))
        try:
            text = await future
        except Exception:  # noqa: BLE001 - the job runner has sent the error event
            text = None
        item["content"][0]["transcript"] = text
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item["id"],
                         "content_index": 0, "transcript": text or ""})
        await self.send({"type": "conversation.item.done", "item": item, "previous_item_id": previous})



def _echo_part(part: Any) -> dict:
    """A content part as items echo it (audio and image data left out: the client has them)."""
    if not isinstance(part, dict):
        return {}
    kind = part.get("type")
    if kind == "input_text":
        return {"type": kind, "text": part.get("text")}
    if kind == "input_audio":
        return {"type": kind, "transcript": part.get("transcript")}
    return {"type": kind}




_HANDLERS: dict[str, Callable[[LiveSession, dict], Awaitable[None]]] = {
    "session.update": LiveSession._session_update,
    "input_audio_buffer.append": LiveSession._append,
    "input_audio_buffer.commit": LiveSession._commit,
    "input_audio_buffer.clear": LiveSession._clear,
    "conversation.item.create": LiveSession._item_create,
    "conversation.item.truncate": LiveSession._truncate,
    "conversation.item.delete": LiveSession._item_delete,
    "response.create": LiveSession._response_create,
    "response.cancel": LiveSession._response_cancel,
}

__all__ = ["LiveSession", "LiveError", "latency_summary", "pcm16_bytes", "OUTPUT_SAMPLE_RATE"]
