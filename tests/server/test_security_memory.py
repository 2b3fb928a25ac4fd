"""Bounded memory for every input: body bytes are counted as they arrive, audio is capped by its duration
before it is decoded, max_tokens and the prompt are bounded by the model's context (the tiny model's: 4096)."""

from __future__ import annotations

import base64
import io
import select
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server.conftest import API_KEY, MAX_UPLOAD_MB, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def silent_flac(seconds: float, rate: int = 16000, streamed: bool = False) -> bytes:
    """Silence compresses to almost nothing: a small upload that decodes to a lot of samples. ``streamed``:
    written to a pipe, so its header cannot say how long it is."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    with tempfile.TemporaryDirectory() as folder:
        target = "-" if streamed else str(Path(folder) / "silence.flac")
        out = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"anullsrc=r={rate}:cl=mono", "-t",
                              str(seconds), "-c:a", "flac", "-f", "flac", target], check=True, capture_output=True)
        return out.stdout if streamed else Path(target).read_bytes()


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_read(server):
    """No Content-Length: the server counts what arrives and answers 413 at the limit, long before the end."""
    total, chunk = 64 * 1024 * 1024, b"x" * 65536
    host, port = server.url.removeprefix("http://").split(":")
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " +
                     API_KEY.encode() + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break  # it stopped reading
            sent += len(chunk)
        sock.settimeout(120)
        try:
            while b"\r\n\r\n" not in answer:
                piece = sock.recv(65536)
                if not piece:
                    break
                answer += piece
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < total // 2, f"the server read {sent} bytes before refusing"


def test_max_tokens_beyond_the_context_is_400(server):
    client = httpx.Client(base_url=f"{server.url}/v1", headers=AUTH, timeout=120)
    hi = [{"role": "user", "content": "hi"}]
    for tokens in (10**9, 6000, 4096):
        response = client.post("/chat/completions", json={"model": MODEL, "messages": hi, "max_tokens": tokens})
        assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    # prompt + max_tokens over the context: measured with the tokenizer (about 3,000 + 2,000 > 4,096)
    long = [{"role": "user", "content": "hello " * 3000}]
    response = client.post("/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 2000})
    assert response.status_code == 400 and "max_new_tokens asks for 2000" in response.json()["error"]["message"]
    fits = client.post("/chat/completions", json={"model": MODEL, "messages": hi, "max_tokens": 2, "temperature": 0})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] <= 2


def test_an_oversized_prompt_is_refused_by_its_length(server):
    """More characters than 16 per token of context: refused without tokenizing (the message says characters)."""
    text = "word " * (4096 * 16 // 5 + 10)
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120,
                          json={"model": MODEL, "messages": [{"role": "user", "content": text}]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded" and "characters" in \
        error["message"]


def test_chat_audio_longer_than_the_context_holds_is_413_before_decoding(server):
    """200 s of audio (about 5,000 tokens) cannot fit 4,096: refused from the FLAC header, naming the limit."""
    data = base64.b64encode(silent_flac(200)).decode()
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "flac"}}]}]})
    error = response.json()["error"]
    assert response.status_code == 413 and error["param"] == "messages[0].content[0]"
    assert "200 s" in error["message"] and "limit of 163" in error["message"]


@pytest.mark.parametrize("kind", ["flac", "adts"])
def test_chat_audio_without_a_duration_is_capped_while_decoding(server, kind):
    """A streamed FLAC or a raw ADTS stream states no duration: the decode stops at the limit."""
    if kind == "flac":
        data = silent_flac(400, streamed=True)
    else:
        if shutil.which("ffmpeg") is None:
            pytest.skip("ffmpeg is not installed")
        data = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "400",
                               "-c:a", "aac", "-b:a", "8k", "-f", "adts", "-"], check=True, capture_output=True).stdout
    assert len(data) < MAX_UPLOAD_MB * 1024 * 1024 * 3 // 4
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": kind}}]}]})
    assert response.status_code == 413 and "limit of 163" in response.json()["error"]["message"]
    short = silent_flac(3, streamed=True)  # the same kind of stream, short enough: decoded and answered
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(short).decode(), "format": "flac"}}]}]})
    assert response.status_code == 200, response.text


def test_transcription_longer_than_the_limit_is_413(server):
    """Two hours and a bit of silent FLAC (1.4 MB) would decode to gigabytes: refused from its header."""
    data = silent_flac(7300, rate=8000)
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", headers=AUTH, timeout=120,
                          data={"model": MODEL}, files={"file": ("long.flac", data)})
    error = response.json()["error"]
    assert response.status_code == 413 and error["param"] == "file" and "7200 s" in error["message"]


def test_audio_within_the_limits_still_works(server):
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    data = base64.b64encode(buffer.getvalue()).decode()
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]})
    assert response.status_code == 200, response.text
