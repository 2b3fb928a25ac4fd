"""benchmarks/gpu_full_size.py cannot rot without a GPU: --cpu-smoke runs every stage on the tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_full_size.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_without_a_gpu_it_says_so_and_exits_4():
    result = run()
    assert result.returncode == 4
    assert "no CUDA GPU found" in result.stderr and "--cpu-smoke" in result.stderr
    assert result.stdout == ""


def test_cpu_smoke_prints_every_row():
    result = run("--cpu-smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for row in ("| vision encode | 1 slice", "| audio encode | Whisper", "| load |", "| decode, batch 1",
                "| prefill, 16 tokens", "| asr, 4 x 1 s clips", "| TTS first audio", "| TTS real-time factor",
                "| peak memory, asr", "| peak memory, chat + image", "| peak memory, omni"):
        assert row in table, row
    assert "transcripts identical: yes" in table  # batched asr == one by one, inside the benchmark too
    assert "error:" not in table
    core = "n/a (core missing)" in table
    try:
        import minicpmo_cli.generation.decode  # noqa: F401
        assert not core
    except ImportError:
        assert core


def test_gpu_run_without_wheels_is_an_environment_error(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 4 and "gpu_wheels.sh" in result.stderr
