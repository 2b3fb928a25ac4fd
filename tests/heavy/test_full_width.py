"""Full-width smoke test: `chat -i`, `asr` and `tts` through the CLI on the official widths (one layer a tower).

The tiny checkpoints are 32-128 wide, so a wrong head split, a projection between towers of the wrong
width or a hard-coded size passes there; here every tensor has its official shape (LLM 3584 / vocab 151,700
/ 28 + 4 heads, SigLIP 1152, Whisper 1024, TTS 768, DVAE and Vocos as official), random bf16 weights, on
the CPU, in under 6 GB. Marked ``heavy`` (minutes: bf16 matmuls are slow on most CPUs) and deselected by
default: ``python3 -m pytest -m heavy tests/heavy`` or ``python3 benchmarks/full_width_smoke.py``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")]

RAM_LIMIT = 6 * 2**30
CPU_BF16 = ["--device", "cpu", "--dtype", "bfloat16"]


def run(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result


def peak_child_rss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux


@pytest.fixture(scope="module")
def full_width(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("full-width")
    run("-m", "minicpmo_cli.model.full_width", folder)
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (3584, 151700, 28, 4)
    assert config["vision_config"]["hidden_size"] == 1152 and config["audio_config"]["d_model"] == 1024
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    image = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 300, 3), dtype=np.uint8)).save(image)
    clips = folder / "clips"
    clips.mkdir()
    subprocess.run(["espeak-ng", "-w", str(clips / "a.wav"), "Good morning and welcome."], check=True)
    shutil.copy(clips / "a.wav", clips / "b.wav")  # the same length: a and b share one Whisper call
    return {"image": image, "clips": clips}


def test_chat_with_an_image(full_width, media):
    result = run("-m", "minicpmo_cli", "--model", full_width, *CPU_BF16, "chat", "What is in this picture?",
                 "-i", media["image"], "--max-new-tokens", "3", "--num-beams", "1")
    assert result.stdout.decode().strip()  # some (random) text: every id the model can pick has text
    assert peak_child_rss() < RAM_LIMIT


def test_asr_of_a_batch(full_width, media, tmp_path):
    out = tmp_path / "out"
    run("-m", "minicpmo_cli", "--model", full_width, *CPU_BF16, "asr", media["clips"], "-o", out, "-f", "json",
        "--batch-size", "2", "--max-new-tokens", "3")
    records = [json.loads((out / f"{name}.json").read_text()) for name in ("a", "b")]
    for record in records:
        assert record["error"] is None and record["duration"] > 0.5
        assert record["segments"][-1]["end"] == record["duration"]
    assert records[0]["text"] == records[1]["text"]  # same audio, batched together: the same answer
    assert peak_child_rss() < RAM_LIMIT


def test_tts(full_width, tmp_path):
    target = tmp_path / "hello.wav"
    run("-m", "minicpmo_cli", "--model", full_width, *CPU_BF16, "tts", "Hello there.", "-o", target,
        "--max-audio-seconds", "0.5")
    with wave.open(str(target)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert 0 < wav.getnframes() <= 24000 * 0.5 + 256
    assert peak_child_rss() < RAM_LIMIT
