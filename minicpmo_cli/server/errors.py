"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpmo_cli.errors import EnvironmentProblem, MiniCPMOError

logger = logging.getLogger("minicpmo_cli.server")

# Status -> OpenAI's error type for it.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error a route raises on purpose: its status and one-line message go to the client as they are."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers  # e.g. Retry-After on a 429


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_library(exc: MiniCPMOError) -> APIError:
    """The library's one-line errors: bad inputs and options are the client's fault (400)."""
    if isinstance(exc, EnvironmentProblem):
        return APIError(503, str(exc), code="environment")
    # The parameter it names last is the one at fault (the server's JSON fields carry the library's names).
    param = exc.parameters[-1] if getattr(exc, "parameters", ()) else None
    return APIError(400, str(exc), param=param, code="invalid_input")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, headers=exc.headers)

    @app.exception_handler(MiniCPMOError)
    async def _library_error(request: Request, exc: MiniCPMOError):
        error = from_library(exc)
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error_response(400, message, param=param, code="invalid_schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        codes = {404: "unknown_route", 413: "request_too_large"}
        return error_response(exc.status_code, message, code=codes.get(exc.status_code))
    # Unexpected exceptions are answered by the guard (server/guard.py), which keeps the connection alive.


def validation_message(problems: list[dict]) -> tuple[str, str | None]:
    """(one-line message, param) for pydantic's errors: the most specific one, its place written as
    OpenAI's clients show it (``messages[0].content[1].image_url``)."""
    if not problems:
        return "invalid request", None
    first = problems[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        position = first["loc"][-1] if len(first.get("loc", ())) > 1 else None
        at = f" at character {position}" if isinstance(position, int) else ""
        return f"the request body is not valid JSON ({reason}{at})".replace(" ()", ""), None
    chosen = max(problems, key=lambda p: len(_place(p.get("loc", ()))))
    where = _place(chosen.get("loc", ()))
    ctx = chosen.get("ctx") or {}
    kind = chosen.get("type")
    if kind == "lone_surrogate":
        return chosen["msg"], ctx.get("where")
    if kind == "too_many_parts":
        return chosen["msg"], "messages"
    if kind == "union_tag_invalid":
        message = f"unsupported content part type {ctx.get('tag')!r} (text, image_url, input_audio, video_url)"
    elif kind == "union_tag_not_found":
        message = "a content part needs a type (text, image_url, input_audio, video_url)"
    elif kind == "missing" and not where:
        return "the request needs a JSON object as its body", None
    else:
        same = [_wording(p["msg"]) for p in problems if _place(p.get("loc", ())) == where]
        message = "Input should be " + " or ".join(
            dict.fromkeys(m.removeprefix("Input should be ") for m in same)) if len(same) > 1 else same[0]
    return (f"{where}: {message}" if where else message), where or None


def _wording(message: str) -> str:
    import re

    return re.sub(r"a valid dictionary or instance of \w+", "an object", message)


def _place(loc) -> str:
    """pydantic's location -> ``messages[0].content[1].image_url``: no "body", no union branch labels
    (``str``, ``list[...]``), no tag repeated before its field."""
    out: list[str] = []
    for item in loc:
        if item == "body" and not out:
            continue
        if isinstance(item, int):
            out.append(f"[{item}]")
            continue
        name = str(item)
        branch = "[" in name or "-" in name or name in ("str", "int", "float", "bool", "none")
        if branch or (out and out[-1] == f".{name}"):
            continue
        out.append(f".{name}")
    return "".join(out).lstrip(".")
