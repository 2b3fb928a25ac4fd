"""The FastAPI application: routes, the API key check, the upload limit, the web page at `/`."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from minicpmo_cli import __version__
from minicpmo_cli.server import chat, metrics, models, speech, transcriptions, voices
from minicpmo_cli.server.errors import error_response, install_handlers
from minicpmo_cli.server.state import ServerState

STATIC = Path(__file__).with_name("static")


def create_app(state: ServerState) -> FastAPI:
    """The app over ``state``; the model starts loading when the app starts (not before: tests may inject one)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        state.worker.stop()

    app = FastAPI(title="minicpmo", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.minicpmo = state
    install_handlers(app)
    _guard(app, state)
    for module in (chat, transcriptions, speech, models, voices):
        app.include_router(module.router)
    app.include_router(models.health_router)
    app.include_router(metrics.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def _guard(app: FastAPI, state: ServerState) -> None:
    app.add_middleware(_Guard, settings=state.settings)


class _Guard:
    """Every /v1 request: the API key (when the server has one) and the upload size limit.

    A plain ASGI middleware, not @app.middleware: that one wraps ``receive`` and hides a client's disconnect
    from the routes, which need it to cancel generation.
    """

    def __init__(self, app, settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            refusal = self._refusal(headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict):
        settings = self.settings
        if settings.api_key is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                      code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            return error_response(413, f"the request is {int(length)} bytes, over this server's limit of "
                                       f"{settings.max_upload_bytes} bytes (--max-upload-mb)", code="request_too_large")
        return None
