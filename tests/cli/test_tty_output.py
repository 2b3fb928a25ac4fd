"""stdout carries only data, whatever stderr is: progress is drawn on a terminal stderr and never captures stdout.

Real processes on a pseudo-terminal, on the fake engine (tests/fake_engine.py): the terminal is the point here,
not the model."""

from __future__ import annotations

import json

import pytest

from tests.cli.ttyrun import REPO, noise_wav, run_on_terminal

FAST = ["--max-new-tokens", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [noise_wav(folder / "a.wav", 1.0, 1), noise_wav(folder / "b.wav", 1.0, 2)]


def test_redirected_transcripts_land_in_the_file_not_on_the_terminal(tiny_ckpt, clips, tmp_path):
    run = run_on_terminal("--model", tiny_ckpt, "asr", *clips, "-f", "jsonl", *FAST, stdout_file=tmp_path / "out.jsonl",
                          fake_engine=True)
    assert run.returncode == 0, run.terminal
    records = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert [r["path"] for r in records] == [str(c) for c in clips]
    assert "transcribing" in run.terminal  # the progress was shown, on the terminal
    assert '"path"' not in run.terminal  # and no record was printed there


def test_txt_transcripts_of_several_inputs_go_to_stdout(tiny_ckpt, clips, tmp_path):
    run = run_on_terminal("--model", tiny_ckpt, "asr", *clips, *FAST, stdout_file=tmp_path / "out.txt",
                          fake_engine=True)
    assert run.returncode == 0, run.terminal
    text = run.stdout.decode()
    assert text.count("==> ") == 2 and f"==> {clips[1]} <==" in text
    assert "==>" not in run.terminal


@pytest.mark.parametrize("flag", ["-q", "--no-progress"])
def test_quiet_and_no_progress_draw_nothing(tiny_ckpt, clips, tmp_path, flag):
    run = run_on_terminal(flag, "--model", tiny_ckpt, "asr", *clips, "-f", "jsonl", *FAST,
                          stdout_file=tmp_path / "out.jsonl", fake_engine=True)
    assert run.returncode == 0, run.terminal
    assert len(run.stdout.decode().splitlines()) == 2
    assert "transcribing" not in run.terminal and "loading" not in run.terminal


def test_stdout_on_the_same_terminal_gets_whole_lines(tiny_ckpt, clips):
    """stdout and stderr both on the terminal: the bar steps aside, each header lands on a line of its own."""
    pexpect = pytest.importorskip("pexpect")
    import os
    import sys

    env = {**os.environ, "TERM": "xterm-256color",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = pexpect.spawn(sys.executable, ["-m", "tests.fake_engine", "--model", str(tiny_ckpt), "asr",
                                           *map(str, clips), *FAST], env=env, encoding="utf-8", timeout=180,
                          dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    lines = [line.strip("\r") for line in child.before.split("\n")]
    for clip in clips:
        assert any(line.endswith(f"==> {clip} <==") and "━" not in line for line in lines), child.before
