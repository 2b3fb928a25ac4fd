#!/usr/bin/env python3
"""Live conversation latency: end of speech -> first answer audio, prefilling while the user speaks vs after.

A spoken question (espeak-ng) is streamed into a live session (api/live.py, the same code the realtime
websocket runs) at real-time speed in 0.2 s appends, with silence between turns; the session's VAD ends each
turn. Two modes in one run, on the same model, audio and seeds:

- live: each 1 s unit of the turn is prefilled while the user is still speaking (what the server does);
- baseline: the whole turn is prefilled once the VAD has ended it (turn-based serving).

Columns (from each turn's ``response.done`` latency): end of turn -> first audio delta, p50 and p95 (the VAD's
silence window comes before it and is printed beside it), prefill compute per 1 s unit (median), and the
generation's own time to its first audio item (median).

    python benchmarks/live.py                      # CPU, tiny random checkpoint (built in a temp folder)
    python benchmarks/live.py --turns 8 --speed 2  # more turns, streamed at twice real time
    python benchmarks/live.py --full               # GPU: openbmb/MiniCPM-o-2_6 on cuda in bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from minicpmo_cli import api
from minicpmo_cli.api.live_client import LocalTransport, converse, stream_recording
from minicpmo_cli.media.audio import load_audio, resample

QUESTIONS = ("What is the weather like in Paris today?", "Tell me a short story about a dog.",
             "How far away is the moon?", "What should I cook for dinner tonight?")


def spoken_turns(turns: int, gap_seconds: float) -> np.ndarray:
    """The questions spoken one after another at 24 kHz, ``gap_seconds`` of silence after each."""
    if not shutil.which("espeak-ng"):
        raise SystemExit("benchmarks/live.py needs espeak-ng for its spoken questions")
    pieces = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(turns):
            path = Path(folder) / f"q{index}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), QUESTIONS[index % len(QUESTIONS)]], check=True)
            pieces += [resample(load_audio(str(path)), 16000, 24000), np.zeros(int(24000 * gap_seconds), np.float32)]
    return np.concatenate(pieces)


def run_mode(engine, audio: np.ndarray, live: bool, args) -> list[dict]:
    latencies: list[dict] = []

    def on_event(event: dict) -> None:
        if event.get("type") == "response.done":
            latencies.append(event["response"]["latency"])

    session = {"type": "realtime", "seed": 1, "max_output_tokens": args.max_tokens,
               "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": args.silence_ms,
                                                      "interrupt_response": False}}}}
    transport = LocalTransport(engine, prefill_while_speaking=live)
    asyncio.run(converse(transport, session, lambda: stream_recording(transport, audio, [], args.speed), on_event))
    return latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def row(name: str, latencies: list[dict], silence_ms: int) -> str:
    first = [t["speech_end_to_first_audio_ms"] for t in latencies if t["speech_end_to_first_audio_ms"] is not None]
    unit = [t["prefill_ms_per_unit_median"] for t in latencies if t["prefill_ms_per_unit_median"] is not None]
    compute = [t["first_item_compute_ms"] for t in latencies if t.get("first_item_compute_ms") is not None]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return (f"| {name:8} | {len(first):5} | {percentile(first, 50):9.0f} | {percentile(first, 95):9.0f} | "
            f"{silence_ms:10} | {med(unit):12.1f} | {med(compute):13.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a tiny random checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--full", action="store_true", help="openbmb/MiniCPM-o-2_6 on cuda in bfloat16")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--speed", type=float, default=1.0, help="streaming pace (1 = real time)")
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    model, device, dtype = args.model, args.device, args.dtype
    if args.full:
        model, device, dtype = model or "openbmb/MiniCPM-o-2_6", "cuda", "bfloat16"
    folder = None
    if model is None:
        from minicpmo_cli.model.tiny import make_tiny_checkpoint

        folder = tempfile.TemporaryDirectory()
        make_tiny_checkpoint(Path(folder.name))
        model = folder.name
    engine = api.load(api.LoadOptions(model=model, device=device, dtype=dtype), tts=True)
    audio = spoken_turns(args.turns, gap_seconds=1.5)
    run_mode(engine, audio[: 24000 * 3], True, args)  # warm-up (first-call costs)
    results = {name: run_mode(engine, audio, live, args) for name, live in (("live", True), ("baseline", False))}
    print(f"model {model} on {device}; {args.turns} turns streamed at {args.speed}x real time; "
          f"answers of {args.max_tokens} tokens")
    print("| mode     | turns | p50 ms    | p95 ms    | VAD ms     | prefill/unit | first-item ms |")
    print("|----------|-------|-----------|-----------|------------|--------------|---------------|")
    for name, latencies in results.items():
        print(row(name, latencies, args.silence_ms))
    live_p50 = percentile([t["speech_end_to_first_audio_ms"] for t in results["live"]], 50)
    base_p50 = percentile([t["speech_end_to_first_audio_ms"] for t in results["baseline"]], 50)
    print(f"end of turn -> first audio, p50: live / baseline = {live_p50 / base_p50:.2f}")


if __name__ == "__main__":
    main()
