"""GET /v1/models (ready: 503 until the model is loaded) and GET /health (alive: 200 while the server runs,
with ``status`` "loading" or "ok"; 503 only when the model failed to load, since then nothing can be served)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from minicpmo_cli.server.errors import APIError, error_response

router = APIRouter()
health_router = APIRouter()
STARTED = int(time.time())


def _model_card(state) -> dict:
    return {"id": state.settings.model_id, "object": "model", "created": STARTED, "owned_by": "minicpmo"}


@router.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state.minicpmo
    state.ready_engine()  # readiness: 503 while loading (or after a failed load)
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    state = request.app.state.minicpmo
    if model not in state.model_names():
        raise APIError(404, f"the model {model!r} does not exist here", param="model", code="model_not_found")
    return _model_card(state)


@health_router.get("/health")
async def health(request: Request):
    state = request.app.state.minicpmo
    if state.engine is not None:
        return {"status": "ok", "model": state.settings.model_id}
    if state.load_error is not None:
        return error_response(503, f"the model failed to load: {state.load_error}", code="model_load_failed")
    return {"status": "loading", "model": state.settings.model_id}
