#!/usr/bin/env python3
"""The CLI on a CUDA GPU, tiny random checkpoint: does every command work there, and where does start-up go?

Two parts, one table each:

1. Start-up (one process each, as a user runs it): a one-shot ``minicpmo -v chat`` of 256 sampled tokens on
   CUDA with the default step, with the eager step, with the eager step and cuDNN attention left on
   (``TORCH_CUDNN_SDPA_DEPRIORITIZED=0``: torch's own order, which builds a cuDNN graph for every new key
   length), and on the CPU; the wall time of each and its ``-v`` phase lines.
2. Checks, all in this one process through the console entry point (``minicpmo_cli.cli.app.main``), so that
   nine commands cost one interpreter start: greedy ids of the eager step against the captured one (``--step
   eager`` vs ``graph`` where the CLI has ``--step``, else ``--no-compile`` vs ``--compile``), seeded sampling
   twice, ``--quantize int8`` and ``int4``, an image question, asr, tts.

    python benchmarks/gpu_cli_checks.py                 # CUDA GPU; about a minute
    python benchmarks/gpu_cli_checks.py --device cpu    # the same checks on the CPU (slower, no start-up part)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Tell me about the sea."


def run_process(args: list[str], env: dict | None = None, timeout: float = 240) -> tuple[int, float, str]:
    """(exit code, wall seconds, stderr) of `python -m minicpmo_cli ARGS` in a process of its own."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "minicpmo_cli", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL)
        return done.returncode, time.perf_counter() - start, done.stderr
    except subprocess.TimeoutExpired as exc:
        return 124, time.perf_counter() - start, (exc.stderr or b"").decode(errors="replace") if isinstance(
            exc.stderr, bytes) else (exc.stderr or "")


ANSWER = ["--seed", "1", "--min-new-tokens", "256", "--max-new-tokens", "256"]  # the same length everywhere


def startup_part(tiny: Path, device: str) -> list[str]:
    eager = step_flags()[0]
    kept = {"TORCH_CUDNN_SDPA_DEPRIORITIZED": "0"}  # torch's own order: cuDNN attention first on Hopper
    runs = [("CUDA, defaults", ["--device", device], None),
            (f"CUDA, {' '.join(eager)}", ["--device", device, *eager], None),
            (f"CUDA, {' '.join(eager)}, cuDNN attention kept", ["--device", device, *eager], kept),
            ("CPU", ["--device", "cpu"], None)]
    lines = ["## one-shot chat start-up (tiny checkpoint, a process each, 256 sampled tokens)", "",
             "| run | exit | wall s | phases (-v) |", "|---|---:|---:|---|"]
    logs = []
    for label, device_args, env in runs:
        code, wall, err = run_process(["-v", "--model", str(tiny), *device_args, "chat", PROMPT, "--no-stdin",
                                       *ANSWER], env)
        phases = [line.removeprefix("startup: ") for line in err.splitlines() if line.startswith("startup:")]
        short = "; ".join(p.split(" (at ")[0] for p in phases)
        lines.append(f"| {label} | {code} | {wall:.1f} | {short} |")
        logs += [f"### {label}", "", "```", *err.splitlines()[-40:], "```", ""]
        print(lines[-1], file=sys.stderr, flush=True)
    return lines + [""] + logs


class InProcess:
    """`minicpmo ARGS` through the console entry point in this process: (exit code, stdout, stderr)."""

    def __call__(self, *args) -> tuple[int, str, str]:
        from minicpmo_cli.cli.app import main

        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return code, out.getvalue(), err.getvalue()


def step_flags() -> tuple[list[str], list[str], str]:
    """(eager flags, captured flags, what they are) for this CLI."""
    from minicpmo_cli.cli import common

    if "--step" in common.GLOBAL_VALUE_OPTIONS:
        return ["--step", "eager"], ["--step", "graph"], "--step eager vs --step graph"
    return ["--no-compile"], ["--compile"], "--no-compile vs --compile (this CLI has no --step)"


def checks(tiny: Path, device: str, workdir: Path) -> list[str]:
    import soundfile
    from PIL import Image

    cli = InProcess()
    base = ["--model", tiny, "--device", device]
    greedy = ["chat", PROMPT, "--no-stdin", "--no-sampling", "--num-beams", "1", "--max-new-tokens", "64"]
    sampled = ["chat", PROMPT, "--no-stdin", "--max-new-tokens", "64"]
    rng = np.random.default_rng(0)
    image = workdir / "image.png"
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(image)
    clip = workdir / "clip.wav"
    soundfile.write(str(clip), (0.1 * rng.standard_normal(3 * 16000)).astype(np.float32), 16000)
    eager, captured, what = step_flags()
    rows: list[tuple[str, bool, float, str]] = []

    def check(name: str, run, judge) -> None:
        start = time.perf_counter()
        try:
            ok, detail = judge(*run())
        except Exception as exc:  # one broken check must not hide the others
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        rows.append((name, ok, time.perf_counter() - start, detail))
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({rows[-1][2]:.1f} s): {detail}", file=sys.stderr, flush=True)

    def same_answers(a, b):
        (code_a, out_a, err_a), (code_b, out_b, err_b) = a, b
        if code_a or code_b:
            return False, f"exit {code_a}/{code_b}: {(err_a + err_b).strip().splitlines()[-1:]}"
        return out_a == out_b and bool(out_a.strip()), f"{len(out_a)} chars; identical: {out_a == out_b}"

    def answered(code, out, err):
        return code == 0 and bool(out.strip()), f"exit {code}; {(out.strip() or err.strip())[:60]!r}"

    if device.startswith("cuda"):
        check(f"greedy ids, {what}", lambda: (cli(*base, *eager, *greedy), cli(*base, *captured, *greedy)),
              same_answers)
    else:  # the captured step is a CUDA graph (or a torch.compile that takes minutes on a CPU)
        rows.append((f"greedy ids, {what}", None, 0.0, "needs a CUDA GPU"))
    check("seeded sampling twice (--seed 7)", lambda: (cli(*base, "--seed", "7", *sampled),
                                                       cli(*base, "--seed", "7", *sampled)), same_answers)
    for mode in ("int8", "int4"):
        check(f"chat --quantize {mode}", lambda mode=mode: cli(*base, "--quantize", mode, *greedy), answered)
    check("chat -i image.png", lambda: cli(*base, "chat", "What is in this picture?", "-i", image, "--no-stdin",
                                           "--max-new-tokens", "16"), answered)
    check("asr clip.wav", lambda: cli(*base, "asr", clip, "--max-new-tokens", "16"),
          lambda code, out, err: (code == 0, f"exit {code}; {out.strip()[:60]!r}"))
    speech = workdir / "speech.wav"
    check("tts -o speech.wav", lambda: cli(*base, "tts", "Hello there.", "-o", speech, "--seed", "1",
                                           "--max-audio-seconds", "2"),
          lambda code, out, err: (code == 0 and speech.is_file() and soundfile.info(str(speech)).samplerate == 24000,
                                  f"exit {code}; {soundfile.info(str(speech)).duration:.2f} s" if speech.is_file()
                                  else f"exit {code}; {err.strip()[-80:]!r}"))
    lines = ["## CLI checks on the device (one process)", "", "| check | result | s | detail |", "|---|---|---:|---|"]
    results = {True: "ok", False: "FAIL", None: "skipped"}
    lines += [f"| {name} | {results[ok]} | {seconds:.1f} | {detail.replace('|', '&#124;')} |"
              for name, ok, seconds, detail in rows]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-startup", action="store_true", help="only the in-process checks")
    args = parser.parse_args(argv)
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="minicpmo-cli-checks-") as tmp:
        tiny = make_tiny_checkpoint(Path(tmp) / "tiny")
        home = Path(tmp) / "home"
        os.environ["MINICPMO_HOME"] = str(home)  # saved voices and caches of this run only
        out = []
        if args.device.startswith("cuda") and not args.skip_startup:
            out += startup_part(tiny, args.device)
            print("\n".join(out), flush=True)
            out = []
        out += checks(tiny, args.device, Path(tmp))
        print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
