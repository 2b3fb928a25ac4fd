"""Every client mistake is a 4xx in OpenAI's shape naming the field, and a 500 leaves the connection usable."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, free_port

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 2, **fields}


def part(value) -> dict:
    return chat(messages=[{"role": "user", "content": [value]}])


# (route, raw JSON body, the param the 400 names)
BAD = [
    ("chat", part({"type": "image_url", "image_url": "http://example.com/a.png"}), "messages[0].content[0].image_url"),
    ("chat", part({"type": "input_audio", "input_audio": [1, 2]}), "messages[0].content[0].input_audio"),
    ("chat", part({"type": "input_audio", "input_audio": {"data": 7}}), "messages[0].content[0].input_audio.data"),
    ("chat", part({"type": "video_url", "video_url": None}), "messages[0].content[0].video_url"),
    ("chat", part({"type": "video_url", "video_url": {"url": "data:,", "fps": 0}}), "messages[0].content[0].video_url.fps"),
    ("chat", part({"type": "video_url", "video_url": {"url": "data:,", "max_frames": 65}}),
     "messages[0].content[0].video_url.max_frames"),
    ("chat", part({"type": "text", "text": {"x": 1}}), "messages[0].content[0].text"),
    ("chat", part({"type": "file", "file": {}}), "messages[0].content[0]"),
    ("chat", part({"text": "no type"}), "messages[0].content[0]"),
    ("chat", part("a bare string"), "messages[0].content[0]"),
    ("chat", chat(messages=[{"role": "user", "content": {"a": 1}}]), "messages[0].content"),
    ("chat", chat(seed=2**64), "seed"),
    ("chat", chat(seed=-(2**64)), "seed"),
    ("chat", chat(repetition_penalty=1e-300), "repetition_penalty"),
    ("chat", chat(top_k=10**30), "top_k"),
    ("chat", chat(num_beams=10**6, sampling=False), "num_beams"),
    ("chat", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("chat", chat(max_tokens=10**9), "max_tokens"),
    ("chat", chat(max_tokens=6000), "max_tokens"),  # the tiny model's context is 4096
    ("chat", chat(max_completion_tokens=5000), "max_completion_tokens"),
    ("speech", {"model": MODEL, "input": "Hello.", "seed": 2**64}, "seed"),
    ("speech", {"model": MODEL, "input": "Hello.", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("speech", {"model": MODEL, "input": "Hello.", "temperature": 1e308}, "temperature"),
    ("speech", {"model": MODEL, "input": "Hello.", "max_new_tokens": 10**12}, "max_new_tokens"),
]
ROUTES = {"chat": "/v1/chat/completions", "speech": "/v1/audio/speech"}


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("route, body, param", BAD, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(BAD)])
def test_bad_values_are_400_naming_the_field(server, route, body, param):
    response = httpx.post(f"{server.url}{ROUTES[route]}", content=json.dumps(body), headers=AUTH, timeout=120)
    error = error_of(response)
    assert error["param"] == param and error["message"].startswith(param)


@pytest.mark.parametrize("route, raw, param", [
    ("chat", '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL,
     "messages[0].content"),
    ("chat", '{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
     % MODEL, "messages[0].content[0].text"),
    ("speech", '{"model": "%s", "input": "x\\ud83d"}' % MODEL, "input"),
    ("speech", '{"model": "%s", "input": "Hello.", "max_audio_seconds": Infinity}' % MODEL, "max_audio_seconds"),
    ("speech", '{"model": "%s", "input": "Hello.", "speed": NaN}' % MODEL, "speed"),
    ("chat", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}' % MODEL,
     "temperature"),
])
def test_lone_surrogates_and_non_finite_numbers_are_400(server, route, raw, param):
    response = httpx.post(f"{server.url}{ROUTES[route]}", content=raw, headers=AUTH, timeout=120)
    assert error_of(response)["param"] == param


@pytest.mark.parametrize("raw", ['{"model": "tiny", "messages": [', "{'model': 1}", "not json at all", ""])
def test_malformed_json_is_400(server, raw):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=AUTH, timeout=120)
    error = error_of(response)
    assert error["param"] is None and ("JSON" in error["message"])


def test_too_many_messages_and_parts_are_400(server):
    many = [{"role": "user", "content": "hi"}] * 2049
    assert error_of(httpx.post(f"{server.url}/v1/chat/completions", json=chat(messages=many), headers=AUTH,
                               timeout=120))["param"] == "messages"
    parts = [{"type": "text", "text": "x"}] * 300
    assert error_of(httpx.post(f"{server.url}/v1/chat/completions",
                               json=chat(messages=[{"role": "user", "content": parts}]), headers=AUTH,
                               timeout=120))["param"] == "messages"


# ------------------------------------------------------------------------------------------ a 500
class _BrokenEngine:
    """An engine whose every use fails unexpectedly: each model request is a 500."""

    @property
    def model(self):
        raise RuntimeError("the engine broke")


@pytest.fixture
def broken_server(tiny_ckpt):
    """The app over an engine that fails, under uvicorn in this process on 127.0.0.1."""
    import uvicorn

    from minicpmo_cli.api.engine import LoadOptions
    from minicpmo_cli.server.app import create_app
    from minicpmo_cli.server.state import ServerState, Settings

    state = ServerState(Settings(load=LoadOptions(model=str(tiny_ckpt)), model_id=MODEL), engine=_BrokenEngine())
    port = free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_a_500_keeps_the_connection_alive(broken_server):
    with httpx.Client(base_url=broken_server, timeout=60) as client:
        failed = client.post("/v1/chat/completions", json=chat())
        assert failed.status_code == 500 and "the engine broke" in failed.json()["error"]["message"]
        assert failed.json()["error"]["type"] == "server_error"
        assert client.get("/health").status_code == 200  # the same client, the next request
    # On one socket: the second request is answered on the connection the 500 came on.
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s")
    body = json.dumps(chat()).encode()
    host, port = broken_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(request % (len(body), body))
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 500"), status
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                assert not line.lower().startswith(b"connection: close")
            assert b"the engine broke" in reader.read(length)


@pytest.mark.parametrize("field, value", [("temperature", "nan"), ("top_p", "inf"), ("top_p", "-1"),
                                          ("top_k", str(10**30)), ("repetition_penalty", "1e-300"),
                                          ("num_beams", str(10**6)), ("max_new_tokens", str(10**12)),
                                          ("max_new_tokens", "5000")])
def test_bad_transcription_fields_are_400(server, media_files, field, value):
    wav = media_files.get("speech")
    data = wav.read_bytes() if wav is not None else b"RIFF"
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                          data={"model": MODEL, field: value}, files={"file": ("a.wav", data)}, timeout=120)
    assert error_of(response)["param"] == field
