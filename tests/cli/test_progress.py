"""Long work is not silent on a terminal (loading, long audio, speech, mimick, chat --speak), and
--no-progress / -q silence all of it, the hub's download bars included.

Real processes on a pseudo-terminal: the long file on the tiny model, the speech commands on the fake engine
(what is drawn is the CLI's, whatever the model says)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import soundfile

from tests.cli.ttyrun import noise_wav, run_on_terminal

SHORT = ["--max-audio-seconds", "0.2", "--seed", "1"]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """75 s of noise: split into three pieces of at most 30 s."""
    return noise_wav(tmp_path_factory.mktemp("long") / "long.wav", 75.0)


def test_loading_and_a_long_file_show_progress_on_the_terminal(tiny_ckpt, long_clip, tmp_path):
    run = run_on_terminal("--model", tiny_ckpt, "--device", "cpu", "asr", long_clip, "--max-new-tokens", "2",
                          "--no-vad", stdout_file=tmp_path / "out.txt")
    assert run.returncode == 0, run.terminal
    assert "loading the model from" in run.terminal
    assert "audio pieces" in run.terminal and "/3" in run.terminal  # pieces of the one long file
    assert run.stdout.strip() and b"audio pieces" not in run.stdout


@pytest.mark.parametrize("args, shown, flag", [
    (["tts", "Hello there. This is a test.", "-o", "{out}/a.wav", *SHORT], "speaking", "-q"),
    (["mimick", "{clip}", "-o", "{out}/b.wav", *SHORT], "re-speaking", "--no-progress"),
    (["chat", "Hi.", "--no-stdin", "--speak", "{out}/c.wav", "--max-new-tokens", "3"], "answering in text and speech",
     "--no-progress"),
])
def test_speech_commands_show_what_they_are_doing(tiny_ckpt, tmp_path, args, shown, flag):
    clip = noise_wav(tmp_path / "in.wav", 1.0)
    args = [a.format(out=tmp_path, clip=clip) for a in args]
    run = run_on_terminal("--model", tiny_ckpt, "--device", "cpu", *args, stdout_file=tmp_path / "stdout",
                          fake_engine=True)
    assert run.returncode == 0, run.terminal
    assert shown in run.terminal and "loading the model" in run.terminal
    written = [p for p in tmp_path.glob("[abc].wav")]
    assert len(written) == 1 and soundfile.info(str(written[0])).samplerate == 24000
    written[0].unlink()
    quiet = run_on_terminal(flag, "--model", tiny_ckpt, "--device", "cpu", *args, stdout_file=tmp_path / "o2",
                            fake_engine=True)
    assert quiet.returncode == 0, quiet.terminal
    assert shown not in quiet.terminal and "loading the model" not in quiet.terminal
    assert written[0].is_file()


def test_no_progress_turns_off_the_hubs_download_bars(cli, fake_engine, tiny_ckpt, tmp_path, monkeypatch):
    import huggingface_hub.utils

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    huggingface_hub.utils.enable_progress_bars()
    clip = noise_wav(tmp_path / "a.wav", 0.5)
    code, _, err = cli("--no-progress", "--model", tiny_ckpt, "--device", "cpu", "asr", clip, "--max-new-tokens",
                       "2", "--no-vad")
    assert code == 0, err
    assert huggingface_hub.utils.are_progress_bars_disabled()
    import os

    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for a download in a fresh interpreter too
    huggingface_hub.utils.enable_progress_bars()
