"""`-v` prints one line per start-up phase of a model command, in order, each with its seconds; without -v none.

One real process (the first phase is the interpreter's own start), the other commands in this process."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile

from tests.conftest import run_cli_process

LINE = re.compile(r"^startup: (?P<name>.+?) (?P<seconds>\d+\.\d\d) s \(at (?P<at>\d+\.\d\d) s\)(?:; .*)?$")
LOAD_PHASES = ["options and inputs", "checkpoint found", "imports", "device start", "model built",
               "weights read", "moved to the device (cpu)", "processor and tokenizers"]


def phases(stderr: str) -> list[tuple[str, float, float]]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("startup:"):
            match = LINE.match(line)
            assert match, line
            found.append((match["name"], float(match["seconds"]), float(match["at"])))
    return found


def test_verbose_chat_prints_every_phase_in_order(tiny_ckpt):
    run = run_cli_process("-v", "--model", tiny_ckpt, "--device", "cpu", "chat", "Hello there",
                          "--max-new-tokens", "3", "--no-stdin")
    assert run.code == 0, run.stderr
    found = phases(run.stderr)
    names = [name for name, _, _ in found]
    assert names == ["python + cli start", *LOAD_PHASES, "first answer text", "rest of the command"]
    ats = [at for _, _, at in found]
    assert ats == sorted(ats) and found[0][1] > 0
    assert "startup:" not in run.stdout


def test_without_verbose_no_phase_lines(cli, tiny_ckpt):
    code, out, err = cli("--model", tiny_ckpt, "--device", "cpu", "chat", "Hello there", "--max-new-tokens", "3",
                         "--no-stdin")
    assert code == 0, err
    assert "startup:" not in err and "startup:" not in out


@pytest.mark.parametrize("args, loaded, first", [
    (["tts", "Hello there.", "-o", "{out}/a.wav", "--max-audio-seconds", "0.2", "--seed", "1"],
     "speech tools", "first audio"),
    (["asr", "{clip}", "--max-new-tokens", "2", "--no-vad"], "processor and tokenizers", "first transcript"),
])
def test_verbose_speech_and_asr_mark_their_first_output(cli, tiny_ckpt, tmp_path, args, loaded, first):
    clip = tmp_path / "clip.wav"
    soundfile.write(str(clip), (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    args = [a.format(out=tmp_path, clip=clip) for a in args]
    code, _, err = cli("-v", "--model", tiny_ckpt, "--device", "cpu", *args)
    assert code == 0, err
    names = [name for name, _, _ in phases(err)]
    assert names[names.index("options and inputs"):] == [*LOAD_PHASES, *([loaded] if loaded not in LOAD_PHASES
                                                                          else []), first, "rest of the command"]
