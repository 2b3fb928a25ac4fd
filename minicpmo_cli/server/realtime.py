"""WS /v1/realtime: OpenAI's Realtime protocol over a websocket. Framing only: the conversation is
api/live.py's :class:`LiveSession`; model work goes through the server's worker like every other request.

Auth as the other routes: ``Authorization: Bearer KEY``, or (browsers cannot set headers on a websocket)
the subprotocol ``openai-insecure-api-key.KEY``; a refused handshake gets a 401 in OpenAI's error shape.
A frame that is not JSON, too large, or not an event is answered with an ``error`` event and the session
goes on. The ``model`` query parameter is accepted loosely (this server serves one model).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from minicpmo_cli.server.errors import APIError, error_response

logger = logging.getLogger("minicpmo_cli.server")
router = APIRouter()
MAX_EVENT_BYTES = 15 * 1024 * 1024  # OpenAI's own limit for one client event (uvicorn closes frames over 16 MiB)
KEY_PROTOCOL = "openai-insecure-api-key."


def _given_key(websocket: WebSocket) -> str | None:
    scheme, _, token = websocket.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":  # the scheme's case does not matter (RFC 7235)
        return token.strip()
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL):]
    return None


async def _refuse(websocket: WebSocket, status: int, message: str, code: str) -> None:
    """A 4xx HTTP answer to the handshake where the server can send one, else a policy close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(status, message, code=code))
    else:
        await websocket.close(code=1008, reason=message[:120])


def _voice_resolver(name: str):
    from minicpmo_cli.api.live import LiveError
    from minicpmo_cli.server.voices import resolve_voice

    try:
        return resolve_voice(name)
    except APIError as exc:
        raise LiveError(exc.message, exc.code or "invalid_value", "session.audio.output.voice") from None


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    state = websocket.app.state.minicpmo
    key = state.settings.api_key
    if key is not None and not hmac.compare_digest((_given_key(websocket) or "").encode(), key.encode()):
        await _refuse(websocket, 401, "missing or wrong API key (send Authorization: Bearer KEY, or the "
                                      f"subprotocol {KEY_PROTOCOL}KEY)", "invalid_api_key")
        return
    try:
        state.check_model(websocket.query_params.get("model") or state.settings.model_id, "realtime")
    except APIError as exc:  # a model this server does not serve (404), or still loading (503)
        await _refuse(websocket, exc.status, exc.message, exc.code or "loading")
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    await _converse(websocket, state)


async def _converse(websocket: WebSocket, state) -> None:
    from minicpmo_cli.api.live import LiveSession

    sending = asyncio.Lock()

    async def send(event: dict) -> None:
        async with sending:
            await websocket.send_text(json.dumps(event, ensure_ascii=False))

    model = websocket.query_params.get("model") or state.settings.model_id
    # Exclusive turns: a live session decodes on its own token loop and seeds torch's global generator, so its
    # jobs run alone on the pool (as on the one worker thread before), and a seed gives the same answer.
    session = LiveSession(lambda fn: state.worker.run(fn, exclusive=True), send, model=model,
                          resolve_voice=_voice_resolver, seed=state.settings.seed)
    try:
        await session.start()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                text = (message.get("bytes") or b"").decode("utf-8", errors="replace")
            event = await _parse(session, text)
            if event is not None:
                await session.handle(event)
    except WebSocketDisconnect:
        pass
    except RuntimeError as exc:  # sending after the client went away
        logger.info("realtime session ended: %s", exc)
    finally:
        await session.close()


async def _parse(session, text: str):
    if len(text) > MAX_EVENT_BYTES:
        await session.error(f"the event is {len(text)} bytes, over the limit of {MAX_EVENT_BYTES}",
                            code="event_too_large")
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        await session.error(f"the event is not valid JSON: {exc.msg} at position {exc.pos}", code="invalid_json")
        return None
