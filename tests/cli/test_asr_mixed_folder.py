"""`asr` on a folder that mixes wav with compressed audio never hangs (issue 25.1).

The audio-decoding threads import PyAV the first time they meet an mp3 or m4a. That import used to enter the
package's import hook, which registered our classes with transformers from the decoding thread while the main
thread was half-way through importing transformers' modeling modules for the model load: a cross-thread import
deadlock (0 % CPU, no output, forever). The compressed files sort last here, so they are decoded while the model
loads, which is when it hung (every run, on the code before the fix). Each run is a fresh interpreter (the hang is
in first imports) under a timeout.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import run_cli_process

RUNS = 4


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    speech = folder.parent / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "Hello, this is a short test of mixed audio."], check=True,
                   capture_output=True)
    for index in range(10):
        shutil.copy(speech, folder / f"a{index}.wav")
    for name in ("y.mp3", "z.m4a"):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(speech), str(folder / name)], check=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
def test_a_folder_of_wav_mp3_and_m4a_is_transcribed_without_hanging(tiny_ckpt, mixed_folder, tmp_path, run):
    out = tmp_path / "out"
    try:
        result = run_cli_process("--model", tiny_ckpt, "--device", "cpu", "asr", mixed_folder, "-o", out,
                                 "--max-new-tokens", "2", timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("asr hung on a folder of wav, mp3 and m4a files (an import deadlock between threads?)")
    assert result.code == 0, result
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.txt" for p in mixed_folder.iterdir())
