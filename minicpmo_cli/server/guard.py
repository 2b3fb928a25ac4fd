"""The ASGI guard in front of every route: who may talk to the server, how much they may send, and a clean
answer when a route fails unexpectedly.

- API key: with --api-key, /v1 routes need ``Authorization: Bearer KEY`` (the scheme in any case, RFC 7235;
  the key compared in constant time).
- Host: without a key, only Host values naming this server's own address, a loopback address or
  ``localhost`` are served (/health excepted). A web page on another site that rebinds its name to this
  machine (DNS rebinding) then reaches nothing: its requests carry its own name.
- Cross-site form posts: a browser sends a form (urlencoded, multipart, text/plain) to any site without
  asking; such a POST whose Origin is another site (or whose Sec-Fetch-Site says so) is refused.
- Body size: the Content-Length is checked first, and the bytes are counted as they arrive, so a chunked
  body without a length is cut off at the limit (413) instead of being read whole.
- Unexpected failures: a 500 in OpenAI's shape, and the connection stays usable. (Starlette's own handler
  re-raises after answering, and the HTTP server then drops the kept-alive connection.)

A plain ASGI middleware, not @app.middleware: that one wraps ``receive`` and hides a client's disconnect
from the routes, which need it to cancel generation. This one passes disconnects through.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from minicpmo_cli.errors import describe_error
from minicpmo_cli.server.errors import error_response

logger = logging.getLogger("minicpmo_cli.server")
SIMPLE_CONTENT_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
OPEN_PATHS = ("/health",)  # served whatever the Host (load balancers, container health checks)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit; FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes (--max-upload-mb)")


class Guard:
    def __init__(self, app, settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await refusal(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope, receive, send):
        limit, received, started = self.settings.max_upload_bytes, 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - answered here so the connection survives
            if isinstance(exc, BodyTooLarge):
                response = error_response(413, exc.detail, code="request_too_large")
            else:
                logger.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
                response = error_response(500, f"internal error: {describe_error(exc)}; the server log has "
                                               "the details")
            if not started:
                await response(scope, receive, send)

    def _refusal(self, scope, headers: dict):
        path = scope.get("path", "")
        settings = self.settings
        if settings.api_key is None and path not in OPEN_PATHS and not _host_allowed(headers.get("host"), scope):
            return error_response(403, f"this server answers requests for its own address or localhost, not for "
                                       f"Host {headers.get('host', '')!r} (start it with --api-key to serve other "
                                       "names)", code="host_not_allowed")
        if scope["type"] == "http" and _cross_site_form(scope, headers):
            return error_response(403, "cross-site form posts are refused (the request's Origin is another site)",
                                  code="cross_site_request")
        if scope["type"] == "websocket" and settings.api_key is None and _foreign_origin(headers):
            # Browsers open websockets to any site without asking (no CORS): a keyless server takes its own pages'.
            return error_response(403, "websockets from another site's page are refused", code="cross_site_request")
        if scope["type"] == "websocket":
            pass  # the route checks the key itself: browsers send it as a subprotocol, not a header
        elif path.startswith("/v1/") and settings.api_key is not None and not _key_matches(headers, settings.api_key):
            return error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                  code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            return error_response(413, f"the request is {int(length)} bytes, over this server's limit of "
                                       f"{settings.max_upload_bytes} bytes (--max-upload-mb)", code="request_too_large")
        return None


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _key_matches(headers: dict, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    given = token.strip().encode("latin-1")
    return hmac.compare_digest(given, api_key.encode("utf-8")) and scheme.lower() == "bearer"


def _host_name(value: str) -> str:
    """The host of a Host header (or an Origin's netloc): no port, no brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _host_allowed(host: str | None, scope) -> bool:
    if not host:
        return False
    name = _host_name(host).rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # browsers resolve *.localhost to loopback themselves
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    server = scope.get("server") or (None, None)
    return ip.is_loopback or (server[0] is not None and name == _host_name(f"[{server[0]}]"
                                                                          if ":" in server[0] else server[0]))


def _cross_site_form(scope, headers: dict) -> bool:
    """A state-changing request a browser would send cross-site without asking (no CORS preflight)."""
    if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
        return False
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type and content_type not in SIMPLE_CONTENT_TYPES:
        return False  # the browser asks first (CORS preflight), and this server allows no other origin
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    return _foreign_origin(headers)


def _foreign_origin(headers: dict) -> bool:
    """The request comes from a page of another site (its Origin is not this server's Host)."""
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser, or a same-origin navigation of an old one
    if origin == "null":
        return True
    origin_host = urlsplit(origin).netloc.lower()
    return origin_host != headers.get("host", "").strip().lower()
