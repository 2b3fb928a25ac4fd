"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpmo_cli.errors import EnvironmentProblem, MiniCPMOError, describe_error

logger = logging.getLogger("minicpmo_cli.server")

# Status -> OpenAI's error type for it.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error",
               503: "server_error"}


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
        problems = exc.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(422, message, param=where or None, code="invalid_schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code="unknown_route" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {describe_error(exc)}; the server log has the details")
