"""GET /v1/models (ready: 503 until the model is loaded) and GET /health (alive: 200 while the server runs,
with ``status`` "loading" or "ok"; 503 only when the model failed to load), and the model names requests may
send.

A request's `model` is accepted when it is one of this server's names (the served names, the checkpoint's hub
id, the --model value), or, unless the server runs with --strict-model-names, one of OpenAI's standard names
for the kind of route it was sent to: off-the-shelf clients hard-code `whisper-1` for transcription, `tts-1`
for speech, `gpt-4o-realtime-preview` for realtime, and `gpt-4o` / `gpt-4o-mini` for chat. A name of another
kind (`tts-1` sent to /v1/audio/transcriptions) is still a 404: it names a model this route cannot be.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from fastapi import APIRouter, Request

from minicpmo_cli.server.errors import APIError, error_response

router = APIRouter()
health_router = APIRouter()
STARTED = int(time.time())

# OpenAI's model names per kind of route. Each also matches with a date suffix (`gpt-4o-2024-08-06`,
# `gpt-4o-realtime-preview-2024-12-17`): clients pin snapshots that way.
OPENAI_NAMES = {
    "chat": ("gpt-4o", "gpt-4o-mini", "gpt-4o-audio-preview", "gpt-4o-mini-audio-preview", "gpt-audio",
             "gpt-audio-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4-turbo", "gpt-4", "gpt-3.5-turbo"),
    "transcription": ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"),
    "speech": ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"),
    "realtime": ("gpt-4o-realtime-preview", "gpt-4o-mini-realtime-preview", "gpt-realtime", "gpt-realtime-mini"),
}
_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_CACHE_FOLDER = re.compile(r"^models--([^/\\]+?)--([^/\\]+)$")  # the hub cache's folder of owner/name


def openai_name(name: str, kind: str) -> bool:
    """True when ``name`` is one of OpenAI's standard model names for routes of ``kind`` (see OPENAI_NAMES)."""
    return _DATE_SUFFIX.sub("", name) in OPENAI_NAMES.get(kind, ())


def openai_kind(name: str) -> str | None:
    """The kind of route OpenAI's model ``name`` belongs to, or None for a name that is not OpenAI's."""
    return next((kind for kind in OPENAI_NAMES if openai_name(name, kind)), None)


def checkpoint_hub_id(model: str) -> str | None:
    """The hub id (owner/name) of the checkpoint ``model`` names: the id itself; for a folder, the repository
    of the hub cache it lies in (``.../models--owner--name/snapshots/REV``), else its config's
    ``_name_or_path`` when that is a hub id (a local path there says nothing). None when neither says."""
    path = Path(model).expanduser()
    if not path.exists():
        return model if _HUB_ID.match(model) else None
    for parts in (path.absolute().parts, path.resolve().parts):
        for part in reversed(parts):
            found = _HUB_CACHE_FOLDER.match(part)
            if found:
                return f"{found[1]}/{found[2]}"
    try:
        name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    return None


def unknown_model(name: str, listed: list[str], kind: str | None, strict: bool) -> APIError:
    """The 404 OpenAI answers for a model it does not have, saying which names this route takes."""
    served = ", ".join(repr(n) for n in listed)
    also = ""
    if kind in OPENAI_NAMES and not strict:
        also = f", or OpenAI's {kind} names ({', '.join(OPENAI_NAMES[kind])})"
    return APIError(404, f"the model {name!r} does not exist here; this route takes {served} (GET /v1/models)"
                         f"{also}", param="model", code="model_not_found")


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": STARTED, "owned_by": "minicpmo"}


@router.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state.minicpmo
    state.ready_engine()  # readiness: 503 while loading (or after a failed load)
    return {"object": "list", "data": [_model_card(name) for name in state.model_names()]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    state = request.app.state.minicpmo
    kind = openai_kind(model)
    if not state.accepts_model(model, kind or "chat"):
        raise unknown_model(model, state.model_names(), None, state.settings.strict_model_names)
    return _model_card(model)


@health_router.get("/health")
async def health(request: Request):
    state = request.app.state.minicpmo
    if state.engine is not None:
        return {"status": "ok", "model": state.settings.model_id}
    if state.load_error is not None:
        return error_response(503, f"the model failed to load: {state.load_error}", code="model_load_failed")
    return {"status": "loading", "model": state.settings.model_id}
