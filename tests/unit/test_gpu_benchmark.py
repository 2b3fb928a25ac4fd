"""The GPU benchmarks cannot rot without a GPU: --cpu-smoke runs every stage of benchmarks/gpu_full_size.py and
benchmarks/gpu_profile.py on the tiny config, through the same child processes and time limits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_full_size.py"
PROFILE = ROOT / "benchmarks" / "gpu_profile.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args: str, script: Path = SCRIPT, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=ENV,
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
                "| peak memory, asr", "| peak memory, chat + image", "| peak memory, omni",
                "| decode, batch 1, 16-token prompt, LLM int8 |", "| decode, batch 1, 16-token prompt, LLM int4 |",
                "| peak GPU memory, chat decode, LLM int4 |", "| aggregate decode, 4 requests at once | tokens/s |",
                "| time to first token p95, 2 clients | s |"):
        assert row in table, row
    assert "transcripts identical: yes" in table  # batched asr == one by one, inside the benchmark too
    assert "error:" not in table and "stages lost: none" in table
    for stage in ("build", "vision", "audio", "decode", "prefill", "asr", "tts", "memory", "concurrent", "quant-int8"):
        assert f"[{stage}] done" in result.stderr, stage


def test_a_stage_that_hangs_loses_only_itself():
    result = run("--cpu-smoke", "--skip", "tts,memory,concurrent", "--quantize", "none", "--hang-in", "prefill",
                 "--timeouts", "prefill=5")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    before, _, after = table.partition("| stage prefill | - | timeout after")
    assert after, table  # the hung stage has its row, saying what happened to it
    assert "| vision encode | 1 slice" in before and "| decode, batch 1" in before  # rows before it kept
    assert "| asr, 4 x 1 s clips" in after  # a new child ran the stage after it
    assert "| prefill, 16 tokens" not in table
    assert "stages lost: prefill)" in table


def test_rows_are_printed_as_they_are_measured():
    """The decode row is on stdout while a later stage still runs (hangs): nothing waits for the end."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--cpu-smoke", "--skip", "asr,tts,memory",
                                "--quantize", "none", "--hang-in", "prefill"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=ENV, start_new_session=True)
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith("| decode, batch 1"):
                break
        assert seen and seen[-1].startswith("| decode, batch 1"), "".join(seen)
        assert process.poll() is None  # still running: prefill hangs, its limit is the default 150 s
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_profile_cpu_smoke_prints_the_op_table():
    result = run("--cpu-smoke", script=PROFILE)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "| op | input shapes | calls / step |" in table
    rows = [line for line in table.splitlines() if line.startswith("| aten::")]
    assert any(line.startswith("| aten::mm ") or line.startswith("| aten::addmm ") for line in rows), table
    assert any("xLx" in line for line in rows)  # attention over the growing cache: one row for every step
    assert "- eager step:" in table and "GB read" in table


def test_gpu_run_without_wheels_is_an_environment_error(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True,
                            env={**os.environ, "GPU_WHEELS": str(tmp_path / "none"), "OUT": str(tmp_path / "out")})
    assert result.returncode == 4 and "fetch_gpu_wheels.sh" in result.stderr


def test_cli_checks_run_every_command_in_one_process():
    """gpu_cli_checks.py (the CLI part of gpu_run.sh) on the CPU: every check passes but the CUDA-only one."""
    result = run("--device", "cpu", script=ROOT / "benchmarks" / "gpu_cli_checks.py")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    results = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1] for line in rows}
    assert len(results) == 7, result.stdout
    assert [name for name, outcome in results.items() if outcome == "skipped"] == [
        next(name for name in results if name.startswith("greedy ids"))]
    assert all(outcome in ("ok", "skipped") for outcome in results.values()), result.stdout


def test_dry_run_prints_the_full_size_plan_without_a_gpu():
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| plan (meta) | llm | 14521 | MiB | 7613.0 M parameters, torch.bfloat16 |" in result.stdout
    assert "| plan (meta) | all towers | 16598 | MiB |" in result.stdout


def test_rows_print_with_their_table_header_and_the_quantized_ratio(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_compare import TablePrinter

    printer = TablePrinter()
    printer.row({"table": "towers", "section": "load", "metric": "all", "value": 1.5, "unit": "s", "detail": ""})
    printer.row({"table": "compared", "metric": "decode", "unit": "tokens/s", "ours": 100.0, "baseline": 40.0,
                 "note": "bf16", "relative_to": ""})
    printer.row({"table": "compared", "metric": "decode int4", "unit": "tokens/s", "ours": 250.0, "baseline": None,
                 "note": "int4", "relative_to": "decode"})
    printer.row({"table": "compared", "metric": "decode int8", "unit": "tokens/s", "ours": float("nan"),
                 "baseline": None, "note": "int8", "relative_to": "decode"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| section |") and "| load | all | 1.5 | s |" in lines[3]
    assert lines[5].startswith("| measurement |") and lines[7] == "| decode | tokens/s | 100 | 40 | bf16 |"
    assert lines[8] == "| decode int4 | tokens/s | 250 | - | int4; 2.50x the unquantized row |"
    assert lines[9] == "| decode int8 | tokens/s | nan | - | int8 |"
