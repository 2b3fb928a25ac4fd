"""Load on `minicpmo serve`: this server (requests decoded together on the shared LLM engine) against the
same server with `--max-batch 1` (one request at a time), in one run: throughput and p50/p95 time to first
token and latency of streamed greedy chat at 1, 4, 16 and 32 concurrent clients (the official `openai`
client, one thread each), whether every answer equals the same request alone, and the time of a 1-token
request sent while 15 long answers stream, against its time alone.

    python benchmarks/serve_load.py                       # tiny random checkpoint made in a temp folder
    python benchmarks/serve_load.py --model DIR --requests 32 --new-tokens 64
    python benchmarks/serve_load.py --cli                 # also: `minicpmo asr` per file, fresh vs --server

CPU goals (tiny checkpoint): 16 clients >= 6x the throughput of one-at-a-time with identical answers; the
1-token request behind 15 long ones <= 2x its time alone. Answers are 128 tokens by default (about 100 words,
a short chat answer): with 32 (one sentence) most of a request's time is its HTTP exchange, prompt and
prefill, which batching does not share, and the ratio is lower (see benchmarks/README.md). Needs the serve
extra and the openai client; espeak-ng makes the speech of the CLI comparison (else a synthetic tone).
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


def start_server(model: str, device: str, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "minicpmo_cli", "-q", "--model", model, "--device", device, "serve",
               "--port", str(port), "--served-model-name", MODEL_ID, "--no-tts", "--max-queue", "256", *extra]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200 and health.json().get("status") == "ok":
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


def streamed_chat(client, index: int, new_tokens: int) -> tuple[str, float, float, int]:
    """(answer, time to first token, latency, completion tokens) of one streamed greedy chat request."""
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    stream = client.chat.completions.create(
        model=MODEL_ID, max_tokens=new_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"Tell me about {index}."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(pieces), first if first is not None else time.perf_counter() - start, \
        time.perf_counter() - start, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load_round(url: str, count: int, requests: int, new_tokens: int, warm_up: bool) -> tuple[list[tuple], float]:
    """(each request's (answer, TTFT, latency, tokens), wall seconds) of ``requests`` streamed requests from
    ``count`` concurrent clients; with ``warm_up``, after an untimed round at this concurrency (KV slots
    grown, steps traced)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    total = max(requests, count)
    if warm_up:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda index: streamed_chat(client, -1 - index, new_tokens), range(count)))
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda index: streamed_chat(client, index, new_tokens), range(total)))
    return results, time.perf_counter() - start


def load_rows(urls: dict[str, str], clients: list[int], requests: int, new_tokens: int,
              rounds: int) -> tuple[list[list[str]], dict[str, dict[int, list[float]]], bool]:
    """Rows of the table, requests/s per server, client count and round, and whether every answer equalled
    the same request's first answer. The servers take turns, round after round, so that a machine that
    slows down for a while slows both (the ratio of a round compares neighbours in time)."""
    results = {label: {count: [] for count in clients} for label in urls}
    rates = {label: {count: [] for count in clients} for label in urls}
    alone: dict[int, str] = {}
    identical = True
    for round_ in range(rounds):
        for count in clients:
            for label, url in urls.items():
                found, wall = load_round(url, count, requests, new_tokens, warm_up=round_ == 0)
                for index, (answer, _, _, _) in enumerate(found):
                    identical &= answer == alone.setdefault(index, answer)
                results[label][count] += found
                rates[label][count].append(len(found) / wall)
    rows = []
    for label in urls:
        for count in clients:
            found, rate = results[label][count], statistics.median(rates[label][count])
            ttft, latency = [r[1] for r in found], [r[2] for r in found]
            tokens = statistics.mean(r[3] for r in found)
            rows.append([label, str(count), f"{len(found) // rounds} x {rounds}", f"{rate:.2f}",
                         f"{rate * tokens:.1f}", f"{statistics.median(ttft):.3f}", f"{percentile(ttft, 0.95):.3f}",
                         f"{statistics.median(latency):.3f}", f"{percentile(latency, 0.95):.3f}"])
    return rows, rates, identical


def live_requests(url: str) -> tuple[float, float]:
    """(requests running, requests waiting), from the server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {sample.name: sample.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for sample in family.samples}
    return values["minicpmo:num_requests_running"], values["minicpmo:num_requests_waiting"]


LONG_READERS = """
import sys, threading
from openai import OpenAI

url, count, tokens, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
said = threading.Lock()
client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


def long_answer(n):
    first = True
    for _ in client.chat.completions.create(model=model, max_tokens=tokens, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": f"A long story {n}."}]):
        if first:
            with said:  # one whole line per reader: the benchmark times its short request once all came
                print("streaming", flush=True)
            first = False


readers = [threading.Thread(target=long_answer, args=(n,)) for n in range(count)]
for reader in readers:
    reader.start()
for reader in readers:
    reader.join()
"""


def short_behind_long(url: str, long_tokens: int, max_batch: int, repeats: int = 9,
                      per_round: int = 3) -> tuple[float, float]:
    """(median time of a 1-token request alone, its median time while 15 long answers stream). The 15 long
    answers are read by another process: they stand for other users, whose clients do not share this
    client's interpreter (15 reader threads here would make the timed request wait for this process's GIL).
    The short requests are sent once the long answers stream (their first chunks came: as many as the batch
    holds; one at a time, the others wait in the queue), ``per_round`` of them one after another in each of
    ``repeats`` rounds (the long answers outlast them), after one untimed round (the server's steps for these
    batch sizes and lengths are made then, as in a server that has been running). Alone: as many."""
    import httpx  # noqa: F401 - imported here, not first inside the readers' threads (a partial-import race)
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def one_token() -> float:
        start = time.perf_counter()
        client.chat.completions.create(model=MODEL_ID, max_tokens=1, temperature=0,
                                       messages=[{"role": "user", "content": "Hi."}])
        return time.perf_counter() - start

    one_token()
    alone = statistics.median(one_token() for _ in range(repeats * per_round))
    rounds = [_behind_long_answers(url, long_tokens, max_batch, one_token, per_round) for _ in range(repeats + 1)]
    return alone, statistics.median(t for times in rounds[1:] for t in times)


def _behind_long_answers(url: str, long_tokens: int, max_batch: int, timed, count: int) -> list[float]:
    readers = subprocess.Popen([sys.executable, "-c", LONG_READERS, url, "15", str(long_tokens), MODEL_ID],
                               stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(min(15, max_batch)):
            line = readers.stdout.readline()
            if line != "streaming\n":
                raise SystemExit(f"the long answers' reader process failed: {line!r}")
        while sum(live_requests(url)) < 15:
            time.sleep(0.01)  # one at a time: the others are queued
        times = []
        for _ in range(count if max_batch > 1 else 1):  # one at a time: each waits for all 15 answers
            times.append(timed())
            if sum(live_requests(url)) < 15:
                break  # the long answers ended: later ones would not be behind them
        return times
    finally:
        readers.stdout.read()
        if readers.wait() != 0:
            raise SystemExit("the long answers' reader process failed")


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
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=64, help="requests per row (at least the clients)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per answer of the load rows")
    parser.add_argument("--long-tokens", type=int, default=256, help="the long answers a short request joins")
    parser.add_argument("--max-batch", type=int, default=16, help="of the batched server (serve's default)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row (the servers take turns)")
    parser.add_argument("--cli", action="store_true", help="also time `minicpmo asr` per file (fresh vs --server)")
    parser.add_argument("--files", type=int, default=4, help="files for the CLI comparison")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    servers = {f"batched (--max-batch {args.max_batch})": ["--max-batch", str(args.max_batch)],
               "one at a time (--max-batch 1)": ["--max-batch", "1"]}
    joins, cli, processes, urls = {}, [], [], {}
    with tempfile.TemporaryDirectory(prefix="minicpmo-serve-bench-") as temp:
        folder = Path(temp)
        model = args.model
        if model is None:
            from minicpmo_cli.model.tiny import make_tiny_checkpoint

            model = str(folder / "tiny")
            make_tiny_checkpoint(model)
        try:
            for number, (label, extra) in enumerate(servers.items()):
                process, urls[label] = start_server(model, args.device, folder / f"server{number}.log", *extra)
                processes.append(process)
            rows, rates, identical = load_rows(urls, clients, args.requests, args.new_tokens, args.rounds)
            for label, extra in servers.items():
                joins[label] = short_behind_long(urls[label], args.long_tokens, int(extra[-1]))
            if args.cli:
                first = next(iter(urls.values()))
                cli = cli_rows(first, model, args.device, make_speech(folder, max(1, args.files)), 16)
        finally:
            for process in processes:
                stop(process)
    print(f"model: {args.model or 'tiny random checkpoint'}, device {args.device}, greedy streamed chat, "
          f"{args.new_tokens} new tokens per answer, {os.cpu_count()} CPUs, {args.rounds} rounds (the servers "
          f"take turns; requests/s: the median round)\n")
    print(table(["server", "clients", "requests", "requests/s", "tokens/s", "p50 TTFT s", "p95 TTFT s",
                 "p50 latency s", "p95 latency s"], rows))
    batched, single = servers
    print()
    for count in clients:
        ratios = [b / s for b, s in zip(rates[batched][count], rates[single][count])]
        print(f"{count} clients: batched / one-at-a-time throughput = {statistics.median(ratios):.2f}x "
              f"(median of the rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"answers identical to the same request alone (every row, both servers): {identical}")
    for label, (alone_s, behind_s) in joins.items():
        print(f"{label}: a 1-token request alone {alone_s:.3f} s, behind 15 long answers {behind_s:.3f} s "
              f"({behind_s / alone_s:.2f}x)")
    if cli:
        print()
        print(table(["minicpmo asr, one file per command", "files", "median s per file", "total s"], cli))


if __name__ == "__main__":
    main()
