"""Errors in OpenAI's JSON shape with the right status, through the `openai` client (and raw HTTP)."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MAX_UPLOAD_MB, MODEL


def body_error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    return error


def test_wrong_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="wrong").models.list()
    assert caught.value.status_code == 401 and "API key" in caught.value.message
    assert httpx.get(f"{server.url}/health").status_code == 200  # /health needs no key


def test_unknown_model_and_route_are_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert "llama3" in caught.value.message and caught.value.code == "model_not_found"
    response = httpx.get(f"{server.url}/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and body_error(response)["code"] == "unknown_route"


def test_schema_errors_are_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                temperature=7)
    assert "temperature" in caught.value.message
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and body_error(response)["param"] == "messages"


@pytest.mark.parametrize("part, words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, "image"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, "base64"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "data: or http(s)"),
    ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/none.png"}}, "cannot fetch"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"plain text").decode(), "format": "wav"}},
     "audio"),
    ({"type": "file", "file": {}}, "unsupported content part"),
])
def test_unreadable_media_is_400_naming_the_part(server, part, words):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [part]}])
    assert "messages[0].content[0]" in caught.value.message and words in caught.value.message


def test_bad_parameters_are_400(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        client.audio.speech.create(model=MODEL, input="Hello.", voice="nobody-here")
    with pytest.raises(openai.BadRequestError, match="language"):
        client.audio.transcriptions.create(model=MODEL, file=("a.wav", b"RIFF"), language="fr")


def test_upload_over_the_limit_is_413(server):
    big = b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().audio.transcriptions.create(model=MODEL, file=("big.wav", big))
    assert caught.value.status_code == 413 and "limit" in caught.value.message


def test_503_while_the_model_loads(tiny_ckpt):
    """The app before its model is ready: /health says alive but loading; /v1/models (readiness) and every
    model route say 503 (in process, no lifespan)."""
    from fastapi.testclient import TestClient

    from minicpmo_cli.api.engine import LoadOptions
    from minicpmo_cli.server.app import create_app
    from minicpmo_cli.server.state import ServerState, Settings

    state = ServerState(Settings(load=LoadOptions(model=str(tiny_ckpt)), model_id=MODEL))
    client = TestClient(create_app(state), base_url="http://localhost")  # not entered: the lifespan (which loads) does not run
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "loading"
    models = client.get("/v1/models")
    assert models.status_code == 503 and body_error(models)["code"] == "loading"
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 503 and body_error(chat)["code"] == "loading"
    state.load_error = "no such checkpoint"
    assert "no such checkpoint" in body_error(client.get("/health"))["message"]
    state.worker.stop()


def test_full_pool_is_429_with_retry_after():
    """The pool refuses work beyond its threads plus --max-queue at once (429 + Retry-After), instead of
    letting latency pile up; the refused request costs nothing and the others finish."""
    import asyncio

    from minicpmo_cli.server.errors import APIError
    from minicpmo_cli.server.worker import Pool

    release = threading.Event()
    pool = Pool(lambda: "engine", size=1, max_waiting=1)

    async def scenario():
        first = asyncio.ensure_future(pool.run(lambda engine, cancel: release.wait(5) and engine))
        while pool.running < 1:  # the first job is running: the waiting line is empty again
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(pool.run(lambda engine, cancel: engine))
        while pool.waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(APIError) as caught:
            await pool.run(lambda engine, cancel: engine)
        release.set()
        return caught.value, await first, await second

    refusal, first, second = asyncio.run(scenario())
    assert (refusal.status, first, second) == (429, "engine", "engine")
    assert int(refusal.headers["Retry-After"]) >= 1
    pool.stop()


def test_client_disconnect_cancels_generation(server):
    """A client that leaves mid-answer stops the generation: the next request is served at once."""
    client = server.client()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}],
                                            max_tokens=4000, temperature=0, stream=True)
    for index, _ in enumerate(stream):
        if index == 3:
            break
    stream.close()
    start = time.monotonic()
    quick = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, temperature=0)
    assert quick.usage.completion_tokens == 2
    assert time.monotonic() - start < 30  # 4000 tokens would take minutes
    deadline = time.monotonic() + 10
    while "generation stopped" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client went away: generation stopped" in server.log_text()

    from tests.server.conftest import metrics, post_and_hold, wait_for

    held = post_and_hold(server, "/v1/chat/completions", {  # a non-streamed request whose client gives up
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 4000, "temperature": 0})
    wait_for("it runs", lambda: metrics(server)["minicpmo:num_requests_running"] == 1)
    held.close()
    deadline = time.monotonic() + 15
    while server.log_text().count("client went away") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log_text().count("client went away") >= 2
