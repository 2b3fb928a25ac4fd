"""Load on `minicpmo serve`: requests/s and p50/p95 latency for chat and transcription at 1, 4 and 16
concurrent clients (the official `openai` client, one thread each), and the CLI's `--server` time per file
against a fresh `minicpmo asr` process per file (which loads the model every time).

    python benchmarks/serve_load.py                       # tiny random checkpoint made in a temp folder
    python benchmarks/serve_load.py --model DIR --requests 32 --files 8

The server runs one request at a time on its one model (correctness first: never two requests in one
cache), so requests/s stays flat with more clients while latency grows with the queue; what clients gain is
that the model is loaded once. Needs the serve extra and the openai client; espeak-ng makes the speech
(else a synthetic tone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL_ID = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, device: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "minicpmo_cli", "-q", "--model", model, "--device", device, "serve",
               "--port", str(port), "--served-model-name", MODEL_ID]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def make_speech(folder: Path, count: int) -> list[Path]:
    texts = ["Hello there, this is a short test of the transcription server.",
             "The quick brown fox jumps over the lazy dog.",
             "Please listen carefully and write down every word.",
             "Benchmarks measure what the users will feel."]
    paths = []
    for index in range(count):
        path = folder / f"clip{index}.wav"
        if shutil.which("espeak-ng"):
            subprocess.run(["espeak-ng", "-w", str(path), texts[index % len(texts)]], check=True, capture_output=True)
        else:
            import numpy as np
            import soundfile

            t = np.arange(16000 * 3) / 16000
            soundfile.write(path, (0.3 * np.sin(2 * np.pi * (200 + 40 * index) * t)).astype("float32"), 16000)
        paths.append(path)
    return paths


def load_rows(url: str, clip: bytes, clients: list[int], requests: int, new_tokens: int) -> list[list[str]]:
    from openai import OpenAI

    def chat(client, index):
        return client.chat.completions.create(model=MODEL_ID, max_tokens=new_tokens, temperature=0,
                                              messages=[{"role": "user", "content": f"Tell me about {index}."}])

    def transcribe(client, index):
        return client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", clip),
                                                  extra_body={"max_new_tokens": new_tokens})

    rows = []
    for task, call in (("chat", chat), ("transcription", transcribe)):
        for count in clients:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            call(client, -1)  # warm-up

            def one(index):
                start = time.perf_counter()
                call(client, index)
                return time.perf_counter() - start

            total = max(requests, count)
            start = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                latencies = sorted(pool.map(one, range(total)))
            wall = time.perf_counter() - start
            p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
            rows.append([task, str(count), str(total), f"{total / wall:.2f}", f"{statistics.median(latencies):.3f}",
                         f"{p95:.3f}"])
    return rows


def cli_rows(url: str, model: str, device: str, files: list[Path], new_tokens: int) -> list[list[str]]:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("MINICPMO_SERVER", None)
    base = [sys.executable, "-m", "minicpmo_cli", "-q", "--model", model, "--device", device]
    modes = {"fresh process per file (loads the model)": base,
             "--server per file (a process each, no load)": base + ["--server", url]}
    rows, medians = [], {}
    for label, command in modes.items():
        times = []
        for path in files:
            start = time.perf_counter()
            subprocess.run(command + ["asr", str(path), "--max-new-tokens", str(new_tokens)], check=True,
                           capture_output=True, env=env)
            times.append(time.perf_counter() - start)
        medians[label] = statistics.median(times)
        rows.append([label, str(len(files)), f"{medians[label]:.2f}", f"{sum(times):.2f}"])
    fresh, served = medians.values()
    rows.append(["ratio (fresh / --server)", "", f"{fresh / served:.2f}x", ""])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random one in a temp folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per row (at least the clients)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--files", type=int, default=4, help="files for the CLI comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="minicpmo-serve-bench-") as temp:
        folder = Path(temp)
        model = args.model
        if model is None:
            from minicpmo_cli.model.tiny import make_tiny_checkpoint

            model = str(folder / "tiny")
            make_tiny_checkpoint(model)
        files = make_speech(folder, max(1, args.files))
        process, url = start_server(model, args.device, folder / "server.log")
        try:
            clients = [int(c) for c in args.clients.split(",")]
            load = load_rows(url, files[0].read_bytes(), clients, args.requests, args.new_tokens)
            cli = cli_rows(url, model, args.device, files, args.new_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"model: {args.model or 'tiny random checkpoint'}, device {args.device}, {args.new_tokens} new tokens "
          f"per answer, {os.cpu_count()} CPUs\n")
    print(table(["task", "clients", "requests", "requests/s", "p50 latency s", "p95 latency s"], load))
    print()
    print(table(["minicpmo asr, one file per command", "files", "median s per file", "total s"], cli))


if __name__ == "__main__":
    main()
