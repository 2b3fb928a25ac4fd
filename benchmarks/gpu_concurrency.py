"""Many users at once on the LLM engine (generation/engine.py), the rows of benchmarks/gpu_full_size.py's
"concurrent" stage (its own child process and time limit):

- aggregate decode with 32 requests decoding together: 32 x (N - 1) / (t(N) - t(1)) over one burst of 32
  greedy requests (as the batch-1 decode row measures one), against one request alone. Goal: >= 1,500 tok/s
  (full-size random weights on one GPU).
- time to first token, p95, of 16 clients each sending requests one after the other (a closed loop on a
  threaded engine: every request joins the others' decoding), against one client alone. Goal: <= 2x alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

AGGREGATE_GOAL = 1500.0  # tokens/s, 32 concurrent requests
TTFT_GOAL = 2.0  # p95 at 16 clients over p95 alone


@dataclass
class Load:
    requests: int = 32  # decoding together for the aggregate row
    clients: int = 16  # closed-loop clients for the time-to-first-token row
    rounds: int = 3  # requests per client
    prompt: int = 512  # prompt positions per request
    new_tokens: int = 128


def prompts(llm, count: int, length: int, device: str) -> list:
    """``count`` distinct random prompts ``[length, D]`` (embeddings of random ids)."""
    import torch

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, llm.config.vocab_size, (count, length), generator=generator).to(device)
    with torch.inference_mode():
        return list(llm.get_input_embeddings()(ids).unbind(0))


def make_engine(llm, device: str, step: str | None, max_batch: int, threaded: bool):
    from minicpmo_cli.generation.engine import LLMEngine
    from minicpmo_cli.generation.step_runner import StepRunner, resolve_step

    return LLMEngine(llm, runner=StepRunner(resolve_step(step, device)), max_batch=max_batch, threaded=threaded)


def settings(new_tokens: int):
    from minicpmo_cli.generation.settings import DecodeSettings

    return DecodeSettings(max_new_tokens=new_tokens)  # greedy, no stop ids: random weights run all N


def burst_seconds(engine, rows: list, new_tokens: int, device: str) -> float:
    """Seconds for ``rows`` submitted at once to be decoded ``new_tokens`` each."""
    from gpu_compare import sync

    from minicpmo_cli.generation.engine import Request

    sync(device)
    start = time.perf_counter()
    handles = [engine.submit(Request(row, settings(new_tokens))) for row in rows]
    for handle in handles:
        handle.result()
    sync(device)
    return time.perf_counter() - start


def decode_rate(llm, rows: list, new_tokens: int, device: str, step: str | None, repeats: int) -> float:
    """Aggregate decode tokens/s of ``rows`` decoding together: len(rows) x (N - 1) / (t(N) - t(1))."""
    engine = make_engine(llm, device, step, len(rows), threaded=False)
    times = {}
    for count in (1, new_tokens):
        burst_seconds(engine, rows, count, device)  # warm-up: the pool and, captured, the graphs
        times[count] = float(np.median([burst_seconds(engine, rows, count, device) for _ in range(repeats)]))
    spent = times[new_tokens] - times[1]
    return len(rows) * (new_tokens - 1) / spent if spent > 0 else float("nan")


def first_token_times(llm, rows: list, load: Load, clients: int, device: str, step: str | None) -> list[float]:
    """Arrival to first token of every request of ``clients`` closed-loop clients (threaded engine)."""
    from minicpmo_cli.generation.engine import Request

    engine = make_engine(llm, device, step, max(clients, 1), threaded=True)
    engine.submit(Request(rows[0], settings(2))).result()  # warm-up
    times: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for round_ in range(load.rounds):
            handle = engine.submit(Request(rows[(index * load.rounds + round_) % len(rows)],
                                           settings(load.new_tokens)))
            handle.result()
            with lock:
                times.append(handle.timings.first_token - handle.timings.submitted)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.close()
    return times


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def concurrency_rows(llm, device: str, step: str | None, load: Load, repeats: int) -> list:
    """The two rows (gpu_compare.Compared), each printed by the caller as it comes."""
    from gpu_compare import Compared

    rows = prompts(llm, load.requests, load.prompt, device)
    many = decode_rate(llm, rows, load.new_tokens, device, step, repeats)
    one = decode_rate(llm, rows[:1], load.new_tokens, device, step, repeats)
    met = "met" if many >= AGGREGATE_GOAL else "missed"
    yield Compared(f"aggregate decode, {load.requests} requests at once", "tokens/s", many, one,
                   f"baseline: one request alone; {load.prompt}-token prompts, {load.new_tokens} new tokens; "
                   f"goal >= {AGGREGATE_GOAL:.0f} ({met})")
    alone = p95(first_token_times(llm, rows, load, 1, device, step))
    loaded = p95(first_token_times(llm, rows, load, load.clients, device, step))
    ratio = loaded / alone if alone > 0 else float("nan")
    yield Compared(f"time to first token p95, {load.clients} clients", "s", loaded, alone,
                   f"baseline: one client alone; {load.rounds} requests per client; {ratio:.2f}x alone, goal <= "
                   f"{TTFT_GOAL:.0f}x ({'met' if ratio <= TTFT_GOAL else 'missed'})")
