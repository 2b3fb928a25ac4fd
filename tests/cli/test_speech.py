"""`minicpmo tts | clone | mimick | voices` end to end, with espeak-ng reference clips.

The behaviour tests (valid 24 kHz mono PCM16 wavs of a bounded length, one file per line, every sentence group
spoken, profiles saved and removed, one-line errors naming the path, the options that reach the engine) run
in-process on the fake engine. The tiny checkpoint keeps what only the model shows: the seed repeats the
audio, mimick's text equals the library's, and one real subprocess pipes text in and wav bytes out.
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


@pytest.fixture
def home(cli) -> Path:
    """The MINICPMO_HOME of the ``cli`` fixture (saved voices live there)."""
    return Path(os.environ["MINICPMO_HOME"])


@pytest.fixture
def real_cli(cli, tiny_ckpt):
    """`minicpmo --model TINY --device cpu ...` in-process, on the tiny checkpoint."""
    return cli.with_args("--model", tiny_ckpt, "--device", "cpu")


@pytest.fixture
def speech_cli(real_cli, fake_engine):
    """The same on the fake engine (tests/fake_engine.py): speech is a sine as long as the text, capped."""
    return real_cli


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


def test_tts_writes_a_bounded_wav_and_the_seed_repeats_it(real_cli, tmp_path):
    for name in ("a.wav", "b.wav"):
        code, out, err = real_cli("tts", "Hello world. This is a test.", "-o", tmp_path / name, "--seed", "5",
                                  *SHORT)
        assert code == 0, err
        assert out == ""
        assert f"wrote {tmp_path / name}" in err
    samples = read_wav(tmp_path / "a.wav")
    assert len(samples) <= CAP_SAMPLES  # one sentence group, capped
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_long_text_is_read_in_full_group_by_group(speech_cli, fake_engine, tmp_path):
    sentences = [f"Sentence {word} is spoken here." for word in ("one", "two", "three", "four", "five", "six")]
    code, _, err = speech_cli("-v", "tts", " ".join(sentences), "-o", tmp_path / "long.wav", *SHORT)
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
    [synthesis] = fake_engine.of_kind("synthesize")  # every group with the one speaker state
    assert len(synthesis.options["groups"]) == len(pieces) and synthesis.options["max_frames"] == CAP_SAMPLES // 512
    assert len(samples) == len(pieces) * CAP_SAMPLES  # the fake speaks 4 frames a character: each group capped


def test_lines_make_one_wav_per_line_and_a_rerun_skips_them(speech_cli, fake_engine, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("First line.\n\n  Second line.\nThird line.\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    code, _, err = speech_cli("tts", "--text-file", text_file, "--lines", "-o", out_dir, *SHORT)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["0001.wav", "0002.wav", "0003.wav"]
    for path in out_dir.iterdir():
        assert len(read_wav(path)) <= CAP_SAMPLES
    spoken = [call.options["groups"] for call in fake_engine.of_kind("synthesize")]
    assert spoken == [["First line."], ["Second line."], ["Third line."]]
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    code, _, err = speech_cli("tts", "--text-file", text_file, "--lines", "-o", out_dir, *SHORT)
    assert code == 0 and "skipping 3 line(s)" in err
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before
    assert len(fake_engine.of_kind("synthesize")) == 3  # nothing spoken again


def test_voice_modes_and_instruction(speech_cli, fake_engine, clips, tmp_path):
    runs = {
        "clone.wav": ["--ref", clips["ref"]],
        "roleplay.wav": ["--ref", clips["ref"], "--mode", "roleplay", "--language", "zh"],
        "assistant.wav": ["--ref", clips["ref"], "--mode", "assistant"],
        "created.wav": ["--instruction", "A calm, deep male voice."],
        "rewritten.wav": ["--ref", clips["ref"], "--no-verbatim", "--max-new-tokens", "4"],
    }
    from minicpmo_cli.processing.prompts import get_sys_prompt

    prompts = {}
    for name, options in runs.items():
        code, _, err = speech_cli("tts", "Good morning.", "-o", tmp_path / name, *options, "--seed", "1", *SHORT)
        assert code == 0, (name, err)
        assert len(read_wav(tmp_path / name)) <= CAP_SAMPLES
        prompts[name] = fake_engine.of_kind("generate")[-1]
    zh_roleplay = get_sys_prompt(ref_audio=np.zeros(1, np.float32), mode="audio_roleplay", language="zh")
    assert prompts["roleplay.wav"].msgs[0]["content"][0] == zh_roleplay["content"][0]
    assert prompts["created.wav"].msgs == [{"role": "user", "content": ["A calm, deep male voice.",
                                                                        "Please read the text below.", "Good morning."]}]
    assert prompts["clone.wav"].decode.max_new_tokens == 1  # verbatim: only the speaker state is wanted
    assert prompts["rewritten.wav"].decode.max_new_tokens == 4  # --no-verbatim: the model writes, within the budget
    assert prompts["clone.wav"].seed == 1 and fake_engine.loads[0].towers["tts"]


def test_clone_saves_a_voice_that_tts_and_clone_reuse_then_voices_lists_and_removes(speech_cli, clips, tmp_path,
                                                                                     home):
    code, _, err = speech_cli("clone", clips["ref"], "Cloned words.", "-o", tmp_path / "c1.wav", "--save-voice",
                              "alice", *SHORT)
    assert code == 0, err
    read_wav(tmp_path / "c1.wav")
    assert (home / "voices" / "alice.wav").is_file() and (home / "voices" / "alice.json").is_file()

    code, out, _ = speech_cli("voices")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "DURATION", "CREATED"]
    name, duration, created = row.split()
    assert name == "alice" and 2.0 < float(duration.rstrip("s")) < 10.0 and created.startswith("20")

    assert speech_cli("clone", "--voice", "alice", "Again.", "-o", tmp_path / "c2.wav", *SHORT)[0] == 0
    assert speech_cli("tts", "And again.", "--voice", "alice", "-o", tmp_path / "t.wav", *SHORT)[0] == 0
    read_wav(tmp_path / "c2.wav")
    read_wav(tmp_path / "t.wav")

    code, _, err = speech_cli("clone", clips["ref"], "x", "-o", tmp_path / "c3.wav", "--save-voice", "alice")
    assert code == 1 and "alice" in err and "already exists" in err and not (tmp_path / "c3.wav").exists()

    assert speech_cli("voices", "remove", "alice")[0] == 0
    assert not (home / "voices" / "alice.wav").exists()
    assert speech_cli("voices")[1] == ""
    code, _, err = speech_cli("voices", "remove", "alice")
    assert code == 1 and "alice" in err


def test_mimick_prints_the_transcription_and_writes_speech(real_cli, clips, tiny_ckpt, tmp_path):
    from minicpmo_cli import api
    from minicpmo_cli.api.speech import frames_for_seconds, mimick
    from minicpmo_cli.media.audio import load_audio

    code, out, err = real_cli("mimick", clips["speech"], "-o", tmp_path / "m.wav", "--max-new-tokens", "4",
                              "--seed", "3", *SHORT)
    assert code == 0, err
    read_wav(tmp_path / "m.wav")
    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, tts=True)
    expected = mimick(engine, load_audio(clips["speech"]), decode=api.DecodeOptions(max_new_tokens=4, seed=3),
                      max_frames=frames_for_seconds(CAP_SECONDS))
    assert out == expected.text + "\n"


def test_stdin_text_and_wav_on_stdout(tiny_ckpt, cli_process, tmp_path):
    """The real `python -m minicpmo_cli` on the tiny model: text piped in, wav bytes piped out (`-o -` is
    stdout, not a file named "-")."""
    result = cli_process("--model", tiny_ckpt, "--device", "cpu", "tts", "-", "-o", "-", *SHORT,
                         stdin=b"Read from stdin.", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert result.stdout_bytes[:4] == b"RIFF"
    assert len(read_wav(result.stdout_bytes)) <= CAP_SAMPLES
    assert not (tmp_path / "-").exists()


def test_output_and_reference_errors_are_one_line_naming_the_path(speech_cli, fake_engine, clips, tmp_path,
                                                                 monkeypatch):
    missing_dir = tmp_path / "no" / "such" / "out.wav"
    code, _, err = speech_cli("tts", "Hi.", "-o", missing_dir)
    assert code == 1 and err.strip() == f"minicpmo: error: {missing_dir}: cannot write here: " \
                                        f"the folder {missing_dir.parent} does not exist"

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        unwritable = locked if _unwritable(locked) else Path("/sys") if _unwritable(Path("/sys")) else None
        if unwritable is not None:
            code, _, err = speech_cli("tts", "Hi.", "-o", unwritable / "out.wav")
            assert code == 1 and len(err.strip().splitlines()) == 1
            assert f"{unwritable / 'out.wav'}: cannot write here" in err and "not writable" in err
    finally:
        locked.chmod(0o700)

    existing = tmp_path / "exists.wav"
    existing.write_bytes(b"keep me")
    code, _, err = speech_cli("tts", "Hi.", "-o", existing)
    assert code == 1 and str(existing) in err and "--overwrite" in err and existing.read_bytes() == b"keep me"

    for bad_ref in (tmp_path / "missing.wav", tmp_path / "corrupt.wav"):
        if bad_ref.name == "corrupt.wav":
            bad_ref.write_text("not audio at all")
        for args in (["tts", "Hi.", "--ref", bad_ref], ["clone", bad_ref, "Hi."]):
            code, _, err = speech_cli(*args, "-o", tmp_path / "o.wav")
            assert code == 1 and len(err.strip().splitlines()) == 1 and str(bad_ref) in err, err
    code, _, err = speech_cli("tts", "Hi.", "--voice", "nobody", "-o", tmp_path / "o.wav")
    assert code == 1 and "nobody" in err

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, _, err = speech_cli("tts", "Hi.", "-o", "-")
    assert code == 2 and "terminal" in err
    assert not (tmp_path / "o.wav").exists()


def test_usage_errors(speech_cli, fake_engine, clips, tmp_path):
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
        code, _, err = speech_cli(*args, *output)
        assert code == 2 and message in err, (args, err)
    assert not out.exists()


def _unwritable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False
