"""A streamed job's answer as server-sent events, sent by a plain ASGI response.

Starlette's StreamingResponse costs, per answer, a task group with a second task (the body is sent from one,
the other waits for the client's disconnect) and, per event, a pass through an async generator; it also sends
the end of the body as a write of its own. Here one task waits for the client's disconnect (it interrupts the
job's stream: the job is cancelled, its engine slot freed), the route's task sends, and each send carries
everything that came since the last (the first one also the opening event; the last one the closing event and
the end of the body): a short answer goes out in one body write.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from starlette.responses import Response

from minicpmo_cli.server.worker import Stream


class Events(Protocol):
    """The text of one stream's events."""

    opening: str  # before the first items
    closing: str  # after the last items (or the failure)

    def render(self, items: list) -> str:
        """The events of ``items`` (what came since the last send)."""

    def failure(self, exc: BaseException) -> str:
        """The event that tells the client the job failed mid-stream."""


class EventStream(Response):
    """``text/event-stream`` of a :class:`Stream` whose first items were taken already (``first``)."""

    media_type = "text/event-stream"

    def __init__(self, stream: Stream, first: list, events: Events, headers: dict[str, str] | None = None) -> None:
        self.stream, self.first, self.events = stream, first, events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._send_events(send)
        finally:
            watcher.cancel()
            self.stream.close()  # a no-op once the job is done; stops it otherwise
        if self.background is not None:
            await self.background()

    async def _send_events(self, send: Any) -> None:
        """Each send holds what came since the last; the last one also the closing event and the body's end.
        Mid-stream failures (of the job, or of rendering its items) become an error event, never a traceback."""
        stream, events = self.stream, self.events
        text, items = events.opening, self.first
        while True:
            try:
                text += events.render(items)
            except Exception as exc:  # noqa: BLE001
                text += events.failure(exc)
                break
            if stream.ended:
                break
            if text:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            try:
                items = await stream.next()
            except Exception as exc:  # noqa: BLE001
                text = events.failure(exc)
                break
            if stream.interrupted:
                return  # the client left: nothing more to send
            text = ""
        await send({"type": "http.response.body", "body": (text + events.closing).encode(), "more_body": False})

    async def _watch(self, receive: Any) -> None:
        """Waits for the client's disconnect (uvicorn answers ``receive`` with it once the client is gone)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.stream.interrupt()
