"""`--server URL` against servers that misbehave: one that accepts connections and never answers, one that
answers /health and then hangs, and ones that answer 200 with something that is not what the route gives.
Every case ends quickly (the timeouts come from the environment) with exit 1 and one line that names the
server and the problem; nothing here needs the model. The servers are started by the tests on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx", reason="--server needs httpx")

QUICK = {"MINICPMO_SERVER_CONNECT_TIMEOUT": "2", "MINICPMO_SERVER_HEALTH_TIMEOUT": "0.5",
         "MINICPMO_SERVER_READ_TIMEOUT": "0.5"}
HEALTH = (200, "application/json", json.dumps({"status": "ok", "model": "tiny"}))


class SilentServer:
    """A socket on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.held:
            connection.close()


class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering each path with a fixed (status, content type, body), or never
    answering it ("hang") until the test ends."""

    def __init__(self, routes: dict) -> None:
        released = self.released = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                route = routes.get(self.path.split("?")[0], (404, "text/plain", "no such route"))
                if route == "hang":
                    released.wait()
                    return
                status, kind, body = route
                data = body if isinstance(body, bytes) else body.encode()
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(routes: dict) -> ScriptedServer:
        servers.append(ScriptedServer({"/health": HEALTH, **routes}))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def remote(cli, monkeypatch):
    """run(url, *args): `minicpmo ARGS` in-process with MINICPMO_SERVER=url and quick timeouts."""
    for name, value in QUICK.items():
        monkeypatch.setenv(name, value)

    def run(url, *args, stdin=""):
        monkeypatch.setenv("MINICPMO_SERVER", url)
        return cli(*args, stdin=stdin)

    return run


@pytest.fixture
def clip(tmp_path):
    import numpy as np
    import soundfile

    path = tmp_path / "clip.wav"
    soundfile.write(str(path), np.zeros(16000, np.float32), 16000)
    return path


def one_line_error(result, *needles) -> str:
    code, _, err = result
    assert code == 1, result
    assert err.count("\n") == 1 and err.startswith("minicpmo: error: "), result
    for needle in needles:
        assert needle in err, result
    return err


def test_a_server_that_never_answers_fails_at_health(cli_process, tmp_path, clip):
    silent = SilentServer()
    try:
        env = {**QUICK, "MINICPMO_SERVER": silent.url}
        for args in (["chat", "Hi."], ["tts", "Hi.", "-o", tmp_path / "x.wav"], ["asr", clip]):
            result = cli_process(*args, env=env, timeout=120)
            one_line_error(result, silent.url, "did not answer /health within 0.5 s",
                           "MINICPMO_SERVER_HEALTH_TIMEOUT")
    finally:
        silent.close()


def test_a_server_that_hangs_on_the_work_fails_at_the_read_timeout(cli_process, scripted, tmp_path):
    server = scripted({"/v1/chat/completions": "hang", "/v1/audio/speech": "hang"})
    env = {**QUICK, "MINICPMO_SERVER": server.url}
    result = cli_process("chat", "Hi.", env=env, timeout=120)
    one_line_error(result, server.url, "did not answer /v1/chat/completions within 0.5 s")
    result = cli_process("tts", "Hi.", "-o", tmp_path / "x.wav", env=env, timeout=120)
    one_line_error(result, server.url, "did not answer /v1/audio/speech within 0.5 s")
    assert not (tmp_path / "x.wav").exists()


def test_chat_answered_200_with_no_completion_is_exit_1(remote, scripted):
    for body in (json.dumps({"object": "list", "data": []}), "<html>hello</html>"):
        kind = "application/json" if body.startswith("{") else "text/html"
        server = scripted({"/v1/chat/completions": (200, kind, body)})
        code, out, err = result = remote(server.url, "chat", "Hi.")
        assert out == ""
        one_line_error(result, server.url, "malformed answer to /v1/chat/completions", "text/event-stream")


@pytest.mark.parametrize("events, problem", [
    (["data: {not json}"], "not JSON"),
    (['data: {"id": "x", "object": "chat.completion.chunk"}'], "without choices"),
    (['data: {"choices": [{"delta": {"content": "Hel"}}]}'], "ended before its [DONE]"),
    (['data: {"choices": [{"delta": {"content": 7}}]}', "data: [DONE]"], "without a text delta"),
])
def test_malformed_chat_streams_are_one_line(remote, scripted, events, problem):
    server = scripted({"/v1/chat/completions": (200, "text/event-stream", "\n\n".join(events) + "\n\n")})
    one_line_error(remote(server.url, "chat", "Hi."), server.url, "malformed answer to /v1/chat/completions",
                   problem)


def test_a_stream_error_event_is_the_servers_message(remote, scripted):
    event = json.dumps({"error": {"message": "out of memory on the GPU", "type": "server_error"}})
    server = scripted({"/v1/chat/completions": (200, "text/event-stream", f"data: {event}\n\ndata: [DONE]\n\n")})
    one_line_error(remote(server.url, "chat", "Hi."), "server: out of memory on the GPU")


def test_malformed_answers_of_the_other_routes(remote, scripted, tmp_path, clip):
    server = scripted({"/v1/audio/speech": (200, "audio/wav", b"RIFF? not a wav at all"),
                       "/v1/audio/transcriptions": (200, "application/json", json.dumps({"txt": "hi"})),
                       "/v1/chat/completions": (200, "application/json",
                                                json.dumps({"choices": [{"message": {"content": "hi"}}]}))})
    one_line_error(remote(server.url, "tts", "Hi.", "-o", tmp_path / "x.wav"), server.url,
                   "malformed answer to /v1/audio/speech", "wav")
    assert not (tmp_path / "x.wav").exists()
    one_line_error(remote(server.url, "asr", clip), server.url, "malformed answer to /v1/audio/transcriptions")
    one_line_error(remote(server.url, "chat", "Hi.", "--speak", tmp_path / "a.wav"), server.url,
                   "malformed answer to /v1/chat/completions", "audio")


def test_bad_health_and_error_pages_are_one_line(remote, scripted):
    server = scripted({"/health": (200, "text/html", "<html>\n<body>a proxy page</body>\n</html>")})
    one_line_error(remote(server.url, "chat", "Hi."), server.url, "malformed answer to /health", "expected JSON")
    server = scripted({"/v1/chat/completions": (502, "text/html", "<html>\n<h1>Bad gateway</h1>\n</html>")})
    one_line_error(remote(server.url, "chat", "Hi."), "HTTP 502", "Bad gateway")


def test_a_bad_timeout_setting_is_a_usage_error(remote, scripted, monkeypatch):
    server = scripted({})
    monkeypatch.setenv("MINICPMO_SERVER_READ_TIMEOUT", "soon")
    code, _, err = remote(server.url, "chat", "Hi.")
    assert code == 2 and "MINICPMO_SERVER_READ_TIMEOUT" in err and err.count("\n") == 1, err
