"""A client that stays connected but stops reading a streamed answer: the job is held back (the outbox is
bounded) and, once nothing was read for --stall-timeout, cancelled, which frees its KV slot; the server keeps
answering others. The server runs in this process (uvicorn on a thread) with small socket buffers, so that a
few kilobytes unread reach the server's job (the kernel would otherwise buffer megabytes of a tiny model's text)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from tests.server.conftest import metrics, wait_for

uvicorn = pytest.importorskip("uvicorn")
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

MODEL = "tiny"
STALL_S = 1.0
MAX_TOKENS = 3000


class SmallBuffers(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a 1 KB write buffer and a 4 KB socket send buffer per connection."""

    def connection_made(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=1024)
        super().connection_made(transport)


@pytest.fixture(scope="module")
def local_server(engine, tiny_ckpt):
    from minicpmo_cli import api
    from minicpmo_cli.server.app import create_app
    from minicpmo_cli.server.state import ServerState, Settings

    settings = Settings(load=api.LoadOptions(model=str(tiny_ckpt), device="cpu"), model_id=MODEL, stall_s=STALL_S)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    config = uvicorn.Config(create_app(ServerState(settings, engine)), http=SmallBuffers, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for("the server started", lambda: server.started, 120)
    host, port = listener.getsockname()

    class Local:
        url = f"http://{host}:{port}"

    yield Local
    server.should_exit = True
    thread.join(timeout=30)
    listener.close()


def post_unread(url: str, path: str, body: dict) -> socket.socket:
    """``body`` posted on a socket with a 4 KB receive buffer that is never read."""
    host = url.removeprefix("http://")
    name, port = host.rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((name, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_stream_nobody_reads_is_cancelled_and_frees_its_slot(local_server, engine):
    before = metrics(local_server)
    generated = engine.llm_engine.stats().generation_tokens_total
    sock = post_unread(local_server.url, "/v1/chat/completions", {
        "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "Tell a very long story."}]})
    try:
        wait_for("the stream running", lambda: metrics(local_server)["minicpmo:num_requests_running"] == 1)
        wait_for("the unread stream given up", lambda: metrics(local_server)["minicpmo:num_requests_running"] == 0)
        wait_for("its slot freed", lambda: engine.llm_engine.stats().slots_used == 0)
        after = metrics(local_server)
        aborted = "minicpmo:request_success_total{finished_reason=abort}"
        assert after.get(aborted, 0) - before.get(aborted, 0) == 1
        assert engine.llm_engine.stats().generation_tokens_total - generated < MAX_TOKENS
        # the server still answers
        import httpx

        answer = httpx.post(f"{local_server.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "Hi."}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        sock.close()
