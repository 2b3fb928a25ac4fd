"""GET /v1/models and GET /health (200 once the model is loaded, 503 while it loads or when it failed)."""

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
    return {"object": "list", "data": [_model_card(request.app.state.minicpmo)]}


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
    return error_response(503, "the model is still loading", code="loading")
