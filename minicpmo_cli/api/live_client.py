"""The client side of a live conversation, for ``minicpmo live``: the same Realtime events whether the model
runs in this process (a :class:`~minicpmo_cli.api.live.LiveSession` here) or on a server (the websocket).

:func:`converse` streams 24 kHz audio (a recording at real-time speed, or the microphone) in 0.2 s appends,
camera frames once per second as ``input_image`` items, and hands what comes back to ``on_event``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from minicpmo_cli.api.live_model import pcm16_bytes

CHUNK_SECONDS = 0.2
RATE = 24000


class LocalTransport:
    """A LiveSession in this process; model jobs run one at a time on a thread."""

    def __init__(self, engine, model_name: str = "local", resolve_voice=None, **session_options) -> None:
        from minicpmo_cli.api.live import LiveSession

        self._events: asyncio.Queue = asyncio.Queue()
        self._lock = threading.Lock()
        self._cancel = threading.Event()

        async def run_model(fn):
            return await asyncio.to_thread(self._locked, fn, engine)

        self.session = LiveSession(run_model, self._events.put, model=model_name,
                                   resolve_voice=resolve_voice or (lambda name: None), **session_options)

    def _locked(self, fn, engine):
        with self._lock:
            return fn(engine, self._cancel)

    async def open(self) -> None:
        await self.session.start()

    async def send(self, event: dict) -> None:
        await self.session.handle(event)

    async def events(self) -> AsyncIterator[dict]:
        while True:
            yield await self._events.get()

    async def close(self) -> None:
        self._cancel.set()
        await self.session.close()


class WebSocketTransport:
    """The Realtime protocol to a running ``minicpmo serve`` (``ws://HOST/v1/realtime``)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        base = url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        self.url = f"{base}/v1/realtime"
        self.api_key = api_key
        self.socket = None

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.socket = await connect(self.url, additional_headers=headers, max_size=None)

    async def send(self, event: dict) -> None:
        await self.socket.send(json.dumps(event))

    async def events(self) -> AsyncIterator[dict]:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.socket:
                yield json.loads(message)
        except ConnectionClosed:
            return

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


def image_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def audio_event(samples: np.ndarray) -> dict:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16_bytes(samples)).decode("ascii")}


def frame_event(image) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_image", "image_url": image_data_url(image)}]}}


async def stream_recording(transport, audio: np.ndarray, frames: list, speed: float,
                           tail_seconds: float = 1.5) -> None:
    """Send ``audio`` (24 kHz) as if spoken: 0.2 s appends paced at ``speed`` x real time (0: no pacing), a
    frame at each new second, then ``tail_seconds`` of silence so the server's VAD ends the last turn."""
    step = int(RATE * CHUNK_SECONDS)
    audio = np.concatenate([np.asarray(audio, np.float32), np.zeros(int(RATE * tail_seconds), np.float32)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index, start in enumerate(range(0, len(audio), step)):
        second = start // RATE
        if frames and start % RATE < step and second < len(frames):
            await transport.send(frame_event(frames[second]))
        await transport.send(audio_event(audio[start:start + step]))
        if speed > 0:
            due = started + (index + 1) * CHUNK_SECONDS / speed
            await asyncio.sleep(max(0.0, due - loop.time()))


async def stream_blocks(transport, blocks: AsyncIterator[np.ndarray]) -> None:
    """Send live audio blocks (the microphone) as they come."""
    async for block in blocks:
        await transport.send(audio_event(block))


class Conversation:
    """Counts what was asked and answered, so the caller knows when everything sent has been answered."""

    def __init__(self, on_event: Callable[[dict], Any]) -> None:
        self.on_event = on_event
        self.committed = 0
        self.transcribed = 0
        self.responses = 0
        self.active = False
        self.speaking = False
        self.updates = 0  # session.updated answers seen
        self.errors: list[str] = []
        self.settled = asyncio.Event()

    def update(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.speech_started":
            self.speaking = True
        elif kind in ("input_audio_buffer.committed", "input_audio_buffer.cleared"):
            self.speaking = False
            self.committed += kind == "input_audio_buffer.committed"
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.transcribed += 1
        elif kind == "response.created":
            self.active = True
        elif kind == "response.done":
            self.active, self.responses = False, self.responses + 1
        elif kind == "session.updated":
            self.updates += 1
        elif kind == "error":
            self.errors.append(event["error"].get("message", ""))
        self.on_event(event)

    def is_settled(self) -> bool:
        answered = self.transcribed >= self.committed and self.responses >= self.committed
        return answered and not (self.active or self.speaking)


async def converse(transport, session: dict, send_input: Callable[[], Awaitable[None]],
                   on_event: Callable[[dict], Any], until_settled: bool = True) -> Conversation:
    """Open, configure, run ``send_input`` while events flow to ``on_event``; with ``until_settled``, return
    once the input has been sent and every turn it made has been answered and transcribed."""
    conversation = Conversation(on_event)
    await transport.open()
    try:
        await transport.send({"type": "session.update", "session": session})
        reader = asyncio.ensure_future(_read(transport, conversation))
        await send_input()
        # The server handles events in order: its answer to this marker means every append before it has
        # been heard (and any turn the trailing silence ended has been committed).
        await transport.send({"type": "session.update", "session": {}})
        while until_settled and not reader.done():
            if conversation.updates >= 2 and conversation.is_settled():
                break
            await asyncio.wait({reader}, timeout=0.1)
        if reader.done():
            reader.result()
        reader.cancel()
    finally:
        await transport.close()
    return conversation


async def _read(transport, conversation: Conversation) -> None:
    async for event in transport.events():
        conversation.update(event)
