"""`minicpmo tts | clone | mimick | voices` end to end on the tiny checkpoint, with espeak-ng reference clips.

The tiny model has random weights, so what it says is noise: these tests check structure (valid 24 kHz mono
PCM16 wavs of a bounded length, one file per line, every sentence group spoken, profiles saved and removed,
one-line errors naming the path) and equality with the library where the result is seeded.
Commands run in-process through ``main()`` (the model loads in ~0.1 s after the first time); one
subprocess covers stdin/stdout piping.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CAP_SECONDS = 0.2  # --max-audio-seconds: random weights rarely stop by themselves, keep the audio short
CAP_SAMPLES = round(CAP_SECONDS * 24000 / 512) * 512  # whole 512-sample frames
SHORT = ["--max-audio-seconds", str(CAP_SECONDS)]


@pytest.fixture(scope="module", autouse=True)
def speech_commands():
    """The speech commands on the app (a no-op once cli/app.py registers them itself)."""
    from minicpmo_cli.cli import speech
    from minicpmo_cli.cli.app import app

    if not any(getattr(c.callback, "__name__", "") == "tts" for c in app.registered_commands):
        speech.register(app)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (it makes the reference clips)")
    folder = tmp_path_factory.mktemp("clips")
    texts = {"ref": "This is the reference voice, speaking clearly for a few seconds.",
             "speech": "Please repeat this short sentence."}
    for name, text in texts.items():
        subprocess.run(["espeak-ng", "-w", str(folder / f"{name}.wav"), text], check=True, capture_output=True)
    return {name: folder / f"{name}.wav" for name in texts}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    return tmp_path / "home"


@pytest.fixture
def cli(tiny_ckpt, capsys):
    """Run `minicpmo --model <tiny> --device cpu ARGS...` in-process -> (exit code, stdout, stderr)."""
    from minicpmo_cli.cli.app import main

    def run(*args):
        code = 0
        try:
            main(["--model", str(tiny_ckpt), "--device", "cpu", *map(str, args)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def read_wav(source) -> np.ndarray:
    """Read a wav (path or bytes) and check it is what every speech output must be: 24 kHz mono PCM16."""
    import soundfile

    def opened():
        return str(source) if isinstance(source, (str, Path)) else io.BytesIO(source)

    info = soundfile.info(opened())
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 24000, 1)
    samples, _ = soundfile.read(opened(), dtype="float32")
    assert 0 < len(samples) and np.isfinite(samples).all()
    return samples


def test_tts_writes_a_bounded_wav_and_the_seed_repeats_it(cli, tmp_path):
    for name in ("a.wav", "b.wav"):
        code, out, err = cli("tts", "Hello world. This is a test.", "-o", tmp_path / name, "--seed", "5", *SHORT)
        assert code == 0, err
        assert out == ""
        assert f"wrote {tmp_path / name}" in err
    samples = read_wav(tmp_path / "a.wav")
    assert len(samples) <= CAP_SAMPLES  # one sentence group, capped
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_long_text_is_read_in_full_group_by_group(cli, tmp_path):
    sentences = [f"Sentence {word} is spoken here." for word in ("one", "two", "three", "four", "five", "six")]
    code, _, err = cli("-v", "tts", " ".join(sentences), "-o", tmp_path / "long.wav", *SHORT)
    assert code == 0, err
    pieces = [line for line in err.splitlines() if line.startswith("piece ")]
    assert len(pieces) >= 2  # ~150 ChatTTS tokens of text: more than one 80-token group
    for line in pieces:
        seconds = float(line.split(": ")[1].split(" s")[0])
        assert 0 < seconds <= CAP_SECONDS + 1e-6
    spoken = " ".join(pieces)
    assert all(sentence in spoken for sentence in sentences)  # no sentence dropped or cut
    samples = read_wav(tmp_path / "long.wav")
    assert len(samples) <= len(pieces) * CAP_SAMPLES


def test_lines_make_one_wav_per_line_and_a_rerun_skips_them(cli, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("First line.\n\n  Second line.\nThird line.\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    code, _, err = cli("tts", "--text-file", text_file, "--lines", "-o", out_dir, *SHORT)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["0001.wav", "0002.wav", "0003.wav"]
    for path in out_dir.iterdir():
        assert len(read_wav(path)) <= CAP_SAMPLES
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    code, _, err = cli("tts", "--text-file", text_file, "--lines", "-o", out_dir, *SHORT)
    assert code == 0 and "skipping 3 line(s)" in err
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_voice_modes_and_instruction(cli, clips, tmp_path):
    runs = {
        "clone.wav": ["--ref", clips["ref"]],
        "roleplay.wav": ["--ref", clips["ref"], "--mode", "roleplay", "--language", "zh"],
        "assistant.wav": ["--ref", clips["ref"], "--mode", "assistant"],
        "created.wav": ["--instruction", "A calm, deep male voice."],
        "rewritten.wav": ["--ref", clips["ref"], "--no-verbatim", "--max-new-tokens", "4"],
    }
    for name, options in runs.items():
        code, _, err = cli("tts", "Good morning.", "-o", tmp_path / name, *options, "--seed", "1", *SHORT)
        assert code == 0, (name, err)
        assert len(read_wav(tmp_path / name)) <= CAP_SAMPLES


def test_clone_saves_a_voice_that_tts_and_clone_reuse_then_voices_lists_and_removes(cli, clips, tmp_path, home):
    code, _, err = cli("clone", clips["ref"], "Cloned words.", "-o", tmp_path / "c1.wav", "--save-voice", "alice",
                       *SHORT)
    assert code == 0, err
    read_wav(tmp_path / "c1.wav")
    assert (home / "voices" / "alice.wav").is_file() and (home / "voices" / "alice.json").is_file()

    code, out, _ = cli("voices")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "DURATION", "CREATED"]
    name, duration, created = row.split()
    assert name == "alice" and 2.0 < float(duration.rstrip("s")) < 10.0 and created.startswith("20")

    assert cli("clone", "--voice", "alice", "Again.", "-o", tmp_path / "c2.wav", *SHORT)[0] == 0
    assert cli("tts", "And again.", "--voice", "alice", "-o", tmp_path / "t.wav", *SHORT)[0] == 0
    read_wav(tmp_path / "c2.wav")
    read_wav(tmp_path / "t.wav")

    code, _, err = cli("clone", clips["ref"], "x", "-o", tmp_path / "c3.wav", "--save-voice", "alice")
    assert code == 1 and "alice" in err and "already exists" in err and not (tmp_path / "c3.wav").exists()

    assert cli("voices", "remove", "alice")[0] == 0
    assert not (home / "voices" / "alice.wav").exists()
    assert cli("voices")[1] == ""
    code, _, err = cli("voices", "remove", "alice")
    assert code == 1 and "alice" in err


def test_mimick_prints_the_transcription_and_writes_speech(cli, clips, tiny_ckpt, tmp_path):
    from minicpmo_cli import api
    from minicpmo_cli.api.speech import frames_for_seconds, mimick
    from minicpmo_cli.media.audio import load_audio

    code, out, err = cli("mimick", clips["speech"], "-o", tmp_path / "m.wav", "--max-new-tokens", "4",
                         "--seed", "3", *SHORT)
    assert code == 0, err
    read_wav(tmp_path / "m.wav")
    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, tts=True)
    expected = mimick(engine, load_audio(clips["speech"]), decode=api.DecodeOptions(max_new_tokens=4, seed=3),
                      max_frames=frames_for_seconds(CAP_SECONDS))
    assert out == expected.text + "\n"


def test_stdin_text_and_wav_on_stdout(tiny_ckpt):
    env = {**os.environ, "NO_COLOR": "1"}
    cmd = [sys.executable, "-c", "from minicpmo_cli.cli import speech, app as a; import sys;"
           "any(getattr(c.callback, '__name__', '') == 'tts' for c in a.app.registered_commands) "
           "or speech.register(a.app); a.main(sys.argv[1:])",
           "--model", str(tiny_ckpt), "--device", "cpu", "tts", "-", "-o", "-", *SHORT]
    result = subprocess.run(cmd, input=b"Read from stdin.", capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout[:4] == b"RIFF"
    assert len(read_wav(result.stdout)) <= CAP_SAMPLES


def test_output_and_reference_errors_are_one_line_naming_the_path(cli, clips, tmp_path, monkeypatch):
    missing_dir = tmp_path / "no" / "such" / "out.wav"
    code, _, err = cli("tts", "Hi.", "-o", missing_dir)
    assert code == 1 and err.strip() == f"minicpmo: error: {missing_dir}: cannot write here: " \
                                        f"the folder {missing_dir.parent} does not exist"

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        unwritable = locked if _unwritable(locked) else Path("/sys") if _unwritable(Path("/sys")) else None
        if unwritable is not None:
            code, _, err = cli("tts", "Hi.", "-o", unwritable / "out.wav")
            assert code == 1 and len(err.strip().splitlines()) == 1
            assert f"{unwritable / 'out.wav'}: cannot write here" in err and "not writable" in err
    finally:
        locked.chmod(0o700)

    existing = tmp_path / "exists.wav"
    existing.write_bytes(b"keep me")
    code, _, err = cli("tts", "Hi.", "-o", existing)
    assert code == 1 and str(existing) in err and "--overwrite" in err and existing.read_bytes() == b"keep me"

    for bad_ref in (tmp_path / "missing.wav", tmp_path / "corrupt.wav"):
        if bad_ref.name == "corrupt.wav":
            bad_ref.write_text("not audio at all")
        for args in (["tts", "Hi.", "--ref", bad_ref], ["clone", bad_ref, "Hi."]):
            code, _, err = cli(*args, "-o", tmp_path / "o.wav")
            assert code == 1 and len(err.strip().splitlines()) == 1 and str(bad_ref) in err, err
    code, _, err = cli("tts", "Hi.", "--voice", "nobody", "-o", tmp_path / "o.wav")
    assert code == 1 and "nobody" in err

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, _, err = cli("tts", "Hi.", "-o", "-")
    assert code == 2 and "terminal" in err
    assert not (tmp_path / "o.wav").exists()


def test_usage_errors(cli, clips, tmp_path):
    out = tmp_path / "o.wav"
    cases = [
        (["tts", "Hi.", "--ref", clips["ref"], "--voice", "x"], "not both"),
        (["tts", "Hi.", "--mode", "clone"], "needs a reference"),
        (["tts", "Hi.", "--mode", "assistant"], "add --ref FILE or --voice NAME"),  # not a library warning
        (["tts", "Hi.", "--mode", "roleplay"], "add --ref FILE or --voice NAME"),
        (["tts", "Hi.", "--mode", "whisper"], "--mode"),
        (["tts", "Hi.", "--ref", clips["ref"], "--instruction", "deep"], "--instruction"),
        (["tts", "   ", ], "nothing to say"),
        (["tts", "Hi.", "--language", "fr"], "--language"),
        (["tts", "a\nb", "--lines"], "folder"),
    ]
    for args, message in cases:
        output = ["-o", "-"] if "--lines" in args else ["-o", out]
        code, _, err = cli(*args, *output)
        assert code == 2 and message in err, (args, err)
    assert not out.exists()


def _unwritable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False
