"""Decoding options through the CLI on the tiny checkpoint: refused combinations (exit 2, flag names), the
library's parameter names said as flags, and --seed as a per-call option (same seed, same sampled answer)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SAMPLED = ["--sampling", "--temperature", "1.5", "--top-k", "0", "--top-p", "1.0", "--max-new-tokens", "12"]


def run_cli(*args):
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "minicpmo_cli", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, env=env, timeout=300)


@pytest.mark.parametrize(("args", "flags"), [
    (["chat", "hi", "--sampling", "--num-beams", "4"], ["--sampling", "--num-beams"]),
    (["chat", "hi", "--no-sampling", "--top-p", "0.5"], ["--top-p", "--sampling"]),
    (["asr", "x.wav", "--top-k", "3"], ["--top-k", "--sampling"]),
    (["describe-video", "x.mp4", "--num-beams", "2", "--temperature", "0.4"], ["--temperature"]),
])
def test_contradictory_decoding_options_are_usage_errors(args, flags):
    """Refused before any file is read or model loaded (the inputs here do not even exist)."""
    result = run_cli("--model", "no-such-model-dir/", *args)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("minicpmo: error: ") and "\n" not in line and "Traceback" not in line
    assert all(flag in line for flag in flags)
    assert "top_p" not in line and "num_beams" not in line and "top_k" not in line  # flags, not parameters


def test_bad_dtype_is_said_as_the_flag(tiny_ckpt):
    result = run_cli("--model", tiny_ckpt, "--device", "cpu", "--dtype", "float8", "chat", "hi")
    assert result.returncode == 2, result.stderr
    assert "minicpmo: error: --dtype must be one of auto, bfloat16, float16, float32, not 'float8'" in result.stderr


def test_seed_gives_the_same_sampled_answer_and_another_seed_another(tiny_ckpt):
    base = ["--model", tiny_ckpt, "--device", "cpu"]
    first = run_cli(*base, "--seed", "11", "chat", "Tell me something.", *SAMPLED)
    again = run_cli(*base, "chat", "Tell me something.", *SAMPLED, "--seed", "11")
    other = run_cli(*base, "--seed", "12", "chat", "Tell me something.", *SAMPLED)
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr + other.stderr
    assert first.stdout.strip() and first.stdout == again.stdout
    assert other.stdout != first.stdout


def test_seed_is_per_call_in_the_library(tiny_ckpt):
    """Two calls with one seed draw the same ids, whatever ran in between; another seed draws others."""
    import torch

    from minicpmo_cli import api
    from minicpmo_cli.generation.decode import generate_ids
    from minicpmo_cli.generation.presets import DecodeOptions, resolve

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=False)
    msgs = [{"role": "user", "content": ["Tell me something."]}]
    options = DecodeOptions(sampling=True, temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=12, seed=5)
    seen = []
    real = generate_ids

    def spy(*args, **kwargs):
        rows = real(*args, **kwargs)
        seen.append(rows[0])
        return rows

    import minicpmo_cli.generation.decode as decode_module

    decode_module.generate_ids = spy
    try:
        first = engine.generate(msgs, resolve("chat", options))
        torch.rand(100)  # draws in between must not matter
        again = engine.generate(msgs, resolve("chat", options))
        engine.generate(msgs, resolve("chat", DecodeOptions(**{**options.chosen(), "seed": 6})))
    finally:
        decode_module.generate_ids = real
    assert len(seen) == 3 and seen[0] == seen[1] and seen[0] != seen[2]
    assert first == again
