"""One real `minicpmo serve` (uvicorn on 127.0.0.1, a free port, the tiny checkpoint) for the server tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("openai", reason="the openai client (test extra) is not installed")

API_KEY = "test-key"
MODEL = "tiny"
MAX_UPLOAD_MB = 2


@dataclass
class Server:
    url: str
    home: Path  # MINICPMO_HOME of the server: its saved voices
    log: Path
    process: subprocess.Popen

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", API_KEY), max_retries=0,
                      timeout=kwargs.pop("timeout", 120), **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200 and health.json().get("status") == "ok":  # loaded, not only alive
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout} s:\n{log.read_text()}")


def start_server(ckpt: Path, folder: Path, *extra: str) -> Server:
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "server.log"
    env = {**os.environ, "MINICPMO_HOME": str(home), "NO_COLOR": "1"}
    env.pop("MINICPMO_SERVER", None)
    command = [sys.executable, "-m", "minicpmo_cli", "-v", "--model", str(ckpt), "--device", "cpu", "serve",
               "--port", str(port), *extra]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", home, log, process)
    try:
        wait_ready(server.url, process, log)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def metrics(server) -> dict[str, float]:
    """/metrics parsed by prometheus_client: sample name (with labels) -> value."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def wait_for(what: str, predicate, deadline_s: float = 300.0):
    """Poll until ``predicate()`` is truthy; the deadline only turns a hang into a failure."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never reached: {what}")


def post_and_hold(server, path: str, body: dict) -> socket.socket:
    """A request sent on a raw socket whose answer is never read: closing the socket is a client leaving."""
    data = json.dumps(body).encode()
    host = server.url.removeprefix("http://")
    name, port = host.rsplit(":", 1)
    sock = socket.create_connection((name, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.fixture(scope="session")
def server(tiny_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    running = start_server(tiny_ckpt, folder, "--served-model-name", MODEL, "--api-key", API_KEY,
                           "--max-upload-mb", str(MAX_UPLOAD_MB))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def engine(tiny_ckpt):
    """The same tiny model in this process: what the server answers must equal what the library answers."""
    from minicpmo_cli import api

    return api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), tts=True)


@pytest.fixture(scope="session")
def media_files(tmp_path_factory) -> dict[str, Path]:
    """A picture, speech (espeak-ng) as wav and mp3, and a 2 s video with sound (ffmpeg)."""
    import shutil

    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("server-media")
    picture = folder / "pic.png"
    image = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(image).ellipse((20, 15, 100, 75), fill="red")
    image.save(picture)
    files = {"picture": picture}
    if shutil.which("espeak-ng"):
        speech = folder / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(speech), "Hello there, this is a test."], check=True,
                       capture_output=True)
        files["speech"] = speech
        ref = folder / "ref.wav"
        subprocess.run(["espeak-ng", "-w", str(ref), "This is the reference voice, speaking clearly."],
                       check=True, capture_output=True)
        files["ref"] = ref
        if shutil.which("ffmpeg"):
            files["mp3"] = folder / "speech.mp3"
            subprocess.run(["ffmpeg", "-v", "error", "-i", str(speech), str(files["mp3"])], check=True)
    if shutil.which("ffmpeg"):
        files["video"] = folder / "clip.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=4", "-f", "lavfi",
                        "-i", "sine=frequency=440:sample_rate=16000", "-t", "2", "-pix_fmt", "yuv420p",
                        "-shortest", str(files["video"])], check=True)
    return files


def need(files: dict, name: str) -> Path:
    if name not in files:
        pytest.skip(f"{name} needs espeak-ng / ffmpeg, which are not installed")
    return files[name]
