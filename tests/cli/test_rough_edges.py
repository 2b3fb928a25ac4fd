"""The smaller rough edges a new user hit: --example pairs, usage lines, help, completion, -v, --no-stdin,
the interrupt message and the tiny checkpoint's file modes."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from tests.cli.ttyrun import noise_wav

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "4"]
COMMANDS = ["asr", "chat", "tts", "clone", "mimick", "describe-video", "omni", "doctor", "voices", "voices add",
            "voices remove"]


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    from minicpmo_cli.cli.app import main

    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path / "home"))

    def run(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return (code, *capsys.readouterr())

    return run


@pytest.mark.parametrize("args, message", [
    (["--example", "a.jpg", "--max-new-tokens", "3"], "--example a.jpg has no ANSWER"),
    (["--example", "a.jpg"], "--example a.jpg has no ANSWER"),
    (["--example", "--max-new-tokens", "3"], "--example has no IMAGE and ANSWER"),
])
def test_example_without_its_answer_does_not_swallow_the_next_option(cli, tmp_path, args, message):
    code, _, err = cli("--model", tmp_path, "chat", "q", "--no-stdin", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_plain_usage_examples_and_the_global_options(cli, command):
    code, out, _ = cli(*command.split(), "-h")
    assert code == 0
    usage = out.split("\n\n")[0]
    for junk in ("{", "<str>", "<path>", "<list[", "<int>"):
        assert junk not in out, (command, junk, usage)
    assert "Examples:" in out and f"$ minicpmo {command}" in out
    assert "Global options" in out and "--device" in out.split("Global options")[1]


def test_shell_completion(tmp_path):
    env = {**os.environ, "_MINICPMO_COMPLETE": "complete_bash", "COMP_WORDS": "minicpmo as", "COMP_CWORD": "1"}
    completed = subprocess.run([sys.executable, "-m", "minicpmo_cli"], capture_output=True, text=True, env=env,
                               timeout=120)
    assert completed.returncode == 0 and completed.stdout.split() == ["asr"]
    script = subprocess.run([sys.executable, "-m", "minicpmo_cli", "--show-completion", "bash"],
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "_MINICPMO_COMPLETE" in script.stdout and "complete " in script.stdout


def test_verbose_shows_device_dtype_attention_and_load_time(cli, tiny_ckpt, tmp_path):
    clip = noise_wav(tmp_path / "a.wav", 0.5)
    code, _, err = cli("-v", "--model", tiny_ckpt, "--device", "cpu", "asr", clip, "--max-new-tokens", "2", "--no-vad")
    assert code == 0, err
    line = next(l for l in err.splitlines() if "model loaded in" in l)
    assert "device cpu, dtype float32, attention sdpa" in line and " s: " in line


def test_no_stdin_leaves_piped_input_alone(cli, tiny_ckpt, monkeypatch):
    def ask(*extra, stdin):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code, out, err = cli("--model", tiny_ckpt, "--device", "cpu", "chat", "Hi.", *GREEDY, *extra)
        assert code == 0, err
        return out, sys.stdin.read()

    alone, _ = ask(stdin="")
    with_notes, rest = ask(stdin="some piped notes that change the question")
    assert rest == "" and with_notes != alone  # read to its end, and part of the question
    ignored, rest = ask("--no-stdin", stdin="some piped notes that change the question")
    assert ignored == alone and rest == "some piped notes that change the question"


def test_interrupt_message_says_what_was_kept(cli, tiny_ckpt, tmp_path, monkeypatch):
    from minicpmo_cli.api import speech

    real_speak = speech.speak
    calls = []

    def speak_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_speak(*args, **kwargs)

    monkeypatch.setattr(speech, "speak", speak_then_interrupt)
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\nSecond line.\n")
    base = ["--model", tiny_ckpt, "--device", "cpu", "tts", "--max-audio-seconds", "0.1"]
    code, _, err = cli(*base, "--text-file", lines, "--lines", "-o", tmp_path / "out")
    assert code == 130 and "1 output file(s) kept" in err and "0001.wav" in err, err
    code, _, err = cli(*base, "Never spoken.", "-o", tmp_path / "none.wav")  # the stub interrupts at once
    assert code == 130 and "no output file was written" in err and "kept" not in err, err
    assert not (tmp_path / "none.wav").exists()


def test_tiny_checkpoint_files_follow_the_umask(tiny_ckpt):
    from minicpmo_cli.temp_files import default_file_mode

    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_ckpt.rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == default_file_mode(), modes
    assert set(modes.values()) == {default_file_mode()}
