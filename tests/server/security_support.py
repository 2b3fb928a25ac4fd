"""What the security tests share: a small HTTP site on 127.0.0.1 that a server under test fetches from (a
picture, text, errors, redirects, and answers that hang or trickle), and one `minicpmo serve` without an API
key that may fetch from loopback (--allow-private-urls), for the tests that need a reachable target."""

from __future__ import annotations

import http.server
import io
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.server.conftest import MODEL, start_server, stop_server

URL_TIMEOUT = 6  # s: --url-timeout of the open server (the trickle test waits this long)


def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Site:
    """A test HTTP server on 127.0.0.1: every request is recorded (path and Host) and can be waited for."""

    host: str = "127.0.0.1"
    requests: list = field(default_factory=list)  # (path, Host header)
    arrived: threading.Event = field(default_factory=threading.Event)  # a /hold or /trickle request came
    release: threading.Event = field(default_factory=threading.Event)  # ends /hold and /trickle answers
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_address[1]}"

    def start(self) -> "Site":
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                site.requests.append((self.path, self.headers.get("Host")))
                path, _, query = self.path.partition("?")
                if path == "/pic.png":
                    self._answer(200, png_bytes(), "image/png")
                elif path == "/text":
                    self._answer(200, b"hello, this is text and not an image", "text/plain")
                elif path == "/missing":
                    self._answer(404, b"not here", "text/plain")
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query.removeprefix("to="))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path in ("/hold", "/trickle"):
                    self._trickle(in_body=path == "/trickle")

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _trickle(self, in_body: bool) -> None:
                """One byte every half second (of a header, or of a long body) until released."""
                site.arrived.set()
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
                    if in_body:
                        self.wfile.write(b"Content-Length: 100000\r\n\r\n")
                    else:
                        self.wfile.write(b"X-Slow: ")
                    self.wfile.flush()
                    deadline = time.monotonic() + 300
                    while not site.release.wait(0.5) and time.monotonic() < deadline:
                        self.wfile.write(b"a")
                        self.wfile.flush()
                except OSError:
                    pass  # the fetcher gave up: what the deadline test wants

        self.server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def site():
    running = Site().start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def open_server(tiny_ckpt, tmp_path_factory):
    """`minicpmo serve` without --api-key that may fetch URLs on loopback."""
    folder = tmp_path_factory.mktemp("open-server")
    running = start_server(tiny_ckpt, folder, "--served-model-name", MODEL, "--allow-private-urls",
                           "--url-timeout", str(URL_TIMEOUT), "--max-upload-mb", "2")
    yield running
    stop_server(running)


def image_request(url: str) -> dict:
    return {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
