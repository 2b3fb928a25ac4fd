"""benchmarks/asr_gpu.py cannot rot without a GPU: --cpu-smoke runs its stages on the tiny checkpoint through the
same child processes and time limits; without a GPU the real run says so and exits 4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "asr_gpu.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV,
                          timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_without_a_gpu_it_says_so_and_exits_4():
    result = run()
    assert result.returncode == 4 and "no CUDA GPU" in result.stderr and result.stdout == ""


def test_cpu_smoke_prints_every_row():
    result = run("--cpu-smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    for row in ("| asr, 8 clips, staged | x real time |", "| asr, one-by-one loop (transcribe per file) |",
                "| asr, staged vs the loop | x |", "| asr, 2 files of 1 min | x real time |"):
        assert row in table
    assert "transcripts identical: yes" in table and "stages lost: none" in table
