"""The FastAPI application: routes, the guard (server/guard.py: key, Host, size), the web page at `/`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from minicpmo_cli import __version__
from minicpmo_cli.server import chat, metrics, models, realtime, speech, transcriptions, voices
from minicpmo_cli.server.errors import install_handlers
from minicpmo_cli.server.guard import Guard
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
    for module in (chat, transcriptions, speech, models, voices, realtime):
        app.include_router(module.router)
    app.include_router(models.health_router)
    app.include_router(metrics.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")

    return app


def _guard(app: FastAPI, state: ServerState) -> None:
    app.add_middleware(Guard, settings=state.settings)
