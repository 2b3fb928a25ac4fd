"""`minicpmo asr` end to end with real (espeak-ng) speech: inputs, records, files, formats, segment times,
exit codes, error lines.

Most tests run in-process on the fake engine (tests/fake_engine.py), whose transcript of a piece is its
length (``clip 2.50 s``): the audio decoding, the VAD, the pieces and every output are real. The tiny
checkpoint keeps the subprocess smoke test (stdout is the library's transcript) and the batching test
(--batch-size 5 gives the same bytes as one piece at a time, which only the real model can show).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

FAST = ["--max-new-tokens", "4"]
SENTENCES = ["Good morning everyone and welcome to the meeting.", "Today we talk about the quarterly results.",
             "Sales went up in the northern region.", "Please send me the report before Friday."]


def speak(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("speech")
    return {"one": speak(SENTENCES[0], folder / "one.wav"), "two": speak(SENTENCES[1], folder / "two.wav")}


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory) -> tuple[Path, list[tuple[float, float]]]:
    """About 70 s: espeak sentences separated by 0.8 s of silence, written at 16 kHz; (path, pauses in s)."""
    import soundfile

    from minicpmo_cli.media.audio import load_audio

    folder = tmp_path_factory.mktemp("long")
    clips = [load_audio(speak(text, folder / f"s{i}.wav")) for i, text in enumerate(SENTENCES)]
    pieces, voiced, total, index = [], [], 0, 0
    while total < 70 * 16000:
        clip = clips[index % len(clips)]
        pieces += [clip, np.zeros(12800, np.float32)]
        loud = np.flatnonzero(np.abs(clip) > 1e-3)  # espeak's clips hold some silence of their own
        voiced.append(((total + loud[0]) / 16000, (total + loud[-1]) / 16000))
        total += len(clip) + 12800
        index += 1
    pauses = [(a[1], b[0]) for a, b in zip(voiced, voiced[1:])]
    path = folder / "meeting.wav"
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path, pauses


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=True, tts=False)


def library_text(engine, path) -> str:
    from minicpmo_cli.api.asr import transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    return transcribe(engine, str(path), decode=DecodeOptions(max_new_tokens=4)).text


@pytest.fixture
def asr(cli, fake_engine, tiny_ckpt):
    """`minicpmo --model TINY ...` on the fake engine."""
    return cli.with_args("--model", tiny_ckpt)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("minicpmo: error:")]


def test_one_file_prints_its_transcript(tiny_ckpt, engine, speech, cli_process):
    result = cli_process("--model", tiny_ckpt, "asr", speech["one"], *FAST, "--device", "cpu")
    assert result.code == 0, result.stderr
    assert result.stdout == library_text(engine, speech["one"]) + "\n"


def test_stdin_gives_the_same_transcript(asr, fake_engine, speech, tmp_path):
    code, stdout, err = asr("asr", "-", "-o", tmp_path, "-f", "json", *FAST, stdin=speech["one"].read_bytes())
    assert code == 0, err
    record = json.loads((tmp_path / "stdin.json").read_text())
    code, stdout, err = asr("asr", speech["one"], "-f", "json", *FAST)
    assert code == 0, err
    assert record["path"] == "-" and record == {**json.loads(stdout), "path": "-"}
    assert record["text"].startswith("clip ") and fake_engine.of_kind("transcribe")[0].decode.max_new_tokens == 4


def test_folder_with_bad_files_then_rerun(asr, speech, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for name in ("one", "two"):
        shutil.copy(speech[name], inbox / f"{name}.wav")
    (inbox / "corrupt.wav").write_bytes(speech["one"].read_bytes()[:30])  # a header cut short
    (inbox / "empty.mp3").write_bytes(b"")
    (inbox / "notes.txt").write_text("not media: a folder contributes only audio/video files")
    code, _, stderr = asr("asr", inbox, "-o", out, "-f", "json", *FAST)
    assert code == 3, stderr
    assert sorted(p.name for p in out.iterdir()) == ["one.json", "two.json"]
    for name in ("one", "two"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["path"] == str(inbox / f"{name}.wav") and record["error"] is None
        assert 0.0 <= record["segments"][0]["start"] < record["segments"][-1]["end"] <= record["duration"]
    errors = error_lines(stderr)
    assert [line for line in errors if "corrupt.wav" in line] and [line for line in errors if "empty.mp3" in line]
    assert len(errors) == 3 and "2 of 4 inputs failed" in errors[-1]  # one line per bad file + the summary

    # A rerun redoes nothing: the finished outputs stay untouched and the model is not even loaded.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = asr("-v", "asr", inbox, "-o", out, "-f", "json", *FAST)
    assert code == 3
    assert "skipped 2 input(s)" in err and "loading" not in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (inbox / "corrupt.wav").unlink()
    (inbox / "empty.mp3").unlink()
    assert asr("asr", inbox, "-o", out, "-f", "json", *FAST).code == 0
    code, _, _ = asr("asr", inbox, "-o", out, "-f", "json", "--overwrite", *FAST)
    assert code == 0
    assert all((out / name).stat().st_mtime_ns != mtime for name, mtime in before.items())


def test_long_recording_gives_timed_segments(asr, fake_engine, long_recording, tmp_path):
    recording, pauses = long_recording
    out = tmp_path / "out"
    code, stdout, err = asr("asr", recording, "-o", out, "-f", "all", "--batch-size", "2", *FAST)
    assert code == 0, err
    assert stdout == ""
    assert sorted(p.name for p in out.iterdir()) == [f"meeting.{ext}" for ext in ("json", "jsonl", "srt",
                                                                                 "txt", "vtt")]
    record = json.loads((out / "meeting.json").read_text())
    assert record == json.loads((out / "meeting.jsonl").read_text())
    assert set(record) == {"path", "text", "language", "duration", "segments", "error"}
    assert record["duration"] == pytest.approx(70.0, abs=3.0)
    segments = record["segments"]
    assert len(segments) >= len(pauses) // 2  # cues follow the sentences (short ones merged up to ~10 s)
    assert 0.0 <= segments[0]["start"] and segments[-1]["end"] <= record["duration"]
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:]))
    assert all(0 < s["end"] - s["start"] <= 10.5 for s in segments)
    for a, b in zip(segments, segments[1:]):  # cue edges lie in one known pause (0.1 s: ~3 VAD windows)
        assert any(p0 - 0.1 <= a["end"] <= p1 and p0 <= b["start"] <= p1 + 0.1 for p0, p1 in pauses), (a, b)
    assert (out / "meeting.txt").read_text() == record["text"].strip() + "\n"
    calls = fake_engine.of_kind("transcribe")
    assert all(len(call.answer) <= 2 for call in calls)  # --batch-size 2
    pieces = [text for call in calls for text in call.answer]
    assert all(re.fullmatch(r"clip \d+\.\d\d s", t) for t in pieces)
    assert sorted(re.findall(r"clip \d+\.\d\d s", record["text"])) == sorted(pieces)  # sent sorted by length

    spoken = [s for s in segments if s["text"].strip()]
    srt_times = re.findall(r"(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)", (out / "meeting.srt").read_text())
    vtt = (out / "meeting.vtt").read_text()
    vtt_times = re.findall(r"(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)", vtt)
    assert vtt.startswith("WEBVTT") and len(srt_times) == len(vtt_times) == len(spoken)
    starts = [to_seconds(a) for a, _ in srt_times]
    assert starts == sorted(starts) and starts == pytest.approx([s["start"] for s in spoken], abs=1e-3)


def to_seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_jsonl_on_stdout_from_a_files_from_list(asr, speech, tmp_path):
    listing = tmp_path / "list.txt"
    missing = tmp_path / "missing.wav"
    listing.write_text(f"# inputs\n{speech['one']}\n\n{missing}\n{speech['two']}\n")
    code, stdout, err = asr("asr", "--files-from", listing, "-f", "jsonl", *FAST)
    assert code == 3
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["path"] for r in records] == [str(speech["one"]), str(missing), str(speech["two"])]
    assert all(set(r) == {"path", "text", "language", "duration", "segments", "error"} for r in records)
    assert records[0]["text"] == json.loads(asr("asr", speech["one"], "-f", "json", *FAST).stdout)["text"]
    assert records[0]["text"].startswith("clip ") and records[0]["error"] is None
    assert records[1]["error"] == "file not found" and records[1]["text"] == ""
    assert [line for line in error_lines(err) if str(missing) in line]


def test_glob_recursive_and_sub_folders(asr, fake_engine, speech, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (inbox / "sub").mkdir(parents=True)
    shutil.copy(speech["one"], inbox / "one.wav")
    shutil.copy(speech["two"], inbox / "sub" / "two.wav")
    code, _, err = asr("asr", inbox, "--recursive", "-o", out, *FAST)
    assert code == 0, err
    assert (out / "one.txt").is_file() and (out / "sub" / "two.txt").is_file()
    assert [load.towers for load in fake_engine.loads] == [{"vision": False, "audio": True, "tts": False}]
    code, stdout, err = asr("asr", str(inbox / "*.wav"), *FAST)  # unexpanded
    assert code == 0, err
    assert stdout.strip() == (out / "one.txt").read_text().strip()


def test_several_inputs_to_stdout_get_headers(asr, fake_engine, speech):
    from minicpmo_cli.api.asr import task_prompt

    code, stdout, err = asr("asr", speech["one"], speech["two"], "--task", "caption", "--language", "zh", *FAST)
    assert code == 0, err
    blocks = re.findall(r"==> (.+) <==\n(.+)\n", stdout)  # each transcript under its input's header
    assert [path for path, _ in blocks] == [str(speech["one"]), str(speech["two"])], stdout
    assert all(re.fullmatch(r"clip \d+\.\d\d s", text) for _, text in blocks)
    sent = {i for call in fake_engine.of_kind("transcribe") for i in call.options["instructions"]}
    assert sent == {task_prompt("caption", "zh")}


@pytest.mark.parametrize("args, message", [
    (["-f", "all"], "-o DIR"),
    (["-f", "json", "EXTRA"], "jsonl"),
    (["--task", "summarise"], "--task"),
    (["--vad-threshold", "1.5"], "--vad-threshold"),
    (["--min-silence-ms", "-1"], "--min-silence-ms"),
    (["--language", "fr"], "'fr' is not supported"),
    (["--batch-size", "0"], "batch-size"),
])
def test_usage_errors(asr, fake_engine, speech, args, message):
    args = [str(speech["two"]) if a == "EXTRA" else a for a in args]
    code, _, err = asr("asr", speech["one"], *args)
    assert fake_engine.calls == []
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("minicpmo: error:")  # one line, every kind


def test_all_formats_rerun_writes_only_the_missing_ones(asr, speech, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "one.txt").write_text("kept\n")
    code, _, err = asr("asr", speech["one"], "-o", out, "-f", "all", *FAST)
    assert code == 0, err
    assert (out / "one.txt").read_text() == "kept\n"  # never replaced without --overwrite
    assert all((out / f"one.{ext}").is_file() for ext in ("json", "srt", "vtt"))


def test_double_star_glob_matches_every_depth(asr, speech, tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    shutil.copy(speech["one"], inbox / "one.wav")
    shutil.copy(speech["two"], inbox / "sub" / "two.wav")
    code, stdout, err = asr("asr", str(inbox / "**" / "*.wav"), *FAST)
    assert code == 0, err
    assert f"==> {inbox / 'one.wav'} <==" in stdout and f"==> {inbox / 'sub' / 'two.wav'} <==" in stdout


def test_one_bad_file_is_one_line_and_exit_1(asr, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("hello")
    code, stdout, err = asr("asr", bad)
    assert code == 1 and stdout == ""
    assert error_lines(err) == [f"minicpmo: error: {bad}: not an audio file (looks like text)"]


def test_inputs_that_would_share_an_output_are_refused(asr, speech, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(speech["one"], other / "one.wav")
    code, _, err = asr("asr", speech["one"], other / "one.wav", "-o", tmp_path / "out")
    assert code == 2 and "same output file" in err
    assert not list((tmp_path / "out").glob("*.txt"))


def test_ctrl_c_keeps_finished_outputs(asr, speech, tmp_path, monkeypatch):
    """Interrupted during the second input: the first one's file is complete, nothing half-written remains."""
    import threading

    from minicpmo_cli.api import asr_model_calls
    from minicpmo_cli.media.audio import load_audio

    real = asr_model_calls.start_batch
    out = tmp_path / "out"
    second = load_audio(str(speech["two"]), 16000).astype("float32").tobytes()
    first_written = threading.Event()

    class Interrupted(asr_model_calls.Pending):
        """A piece of the second input: its answer "comes" once the first input's file is written, as a
        Ctrl-C (pieces are sent sorted by length, so it may be sent before the first input's pieces)."""

        @property
        def done(self) -> bool:
            if (out / "one.txt").exists():
                first_written.set()
            return first_written.is_set()

        def wait(self, cancel=None):
            raise KeyboardInterrupt

        def wait_briefly(self, seconds=0.01):  # the first input's pieces decode on the engine's own thread
            first_written.wait(seconds)

        def abort(self):
            pass

    def interrupt_the_second_input(model, clips, instructions):
        answers = real(model, clips, instructions)
        return [Interrupted() if second.find(clip.astype("float32").tobytes()) >= 0 else answer
                for clip, answer in zip(clips, answers)]

    monkeypatch.setattr(asr_model_calls, "start_batch", interrupt_the_second_input)
    # --language en: with auto, the probes of inputs segmented together go first, before any input is finished.
    code, _, err = asr("asr", speech["one"], speech["two"], "-o", out, "--batch-size", "1", "--language", "en",
                       *FAST)
    assert code == 130, err  # (click handles Ctrl-C itself: exit 130)
    assert [p.name for p in out.iterdir()] == ["one.txt"]
    assert (out / "one.txt").read_text().endswith("\n")


def test_batched_folder_gives_the_same_bytes_as_one_by_one(cli, tiny_ckpt, speech, long_recording, tmp_path):
    """--batch-size 5 (sorted pieces, equal lengths in one Whisper call, decoding ahead) == --batch-size 1."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("one", "two"):
        shutil.copy(speech[name], inbox / f"{name}.wav")
    shutil.copy(speech["one"], inbox / "one_again.wav")  # the same length as one.wav: they share a Whisper call
    speak(SENTENCES[2], inbox / "three.wav")
    shutil.copy(long_recording[0], inbox / "meeting.wav")  # several pieces cut in its pauses
    outputs = {}
    for size in ("1", "5"):
        out = tmp_path / f"out{size}"
        code, _, err = cli("--model", tiny_ckpt, "asr", inbox, "-o", out, "-f", "all", "--batch-size", size, *FAST)
        assert code == 0, err
        outputs[size] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(outputs["1"]) == 5 * 5
    assert outputs["5"] == outputs["1"]
    assert len(json.loads(outputs["1"]["meeting.json"])["segments"]) >= 3


def test_noise_alone_gives_an_empty_transcript_without_the_model(asr, fake_engine, tmp_path):
    """Pure noise: the VAD finds no speech, no piece goes to the model (it is not even loaded), nothing made up."""
    import soundfile

    rng = np.random.default_rng(7)
    noisy = tmp_path / "noise.wav"
    soundfile.write(noisy, (0.05 * rng.standard_normal(16000 * 20)).astype(np.float32), 16000)
    code, stdout, err = asr("-v", "asr", noisy, "-f", "json", *FAST)
    assert code == 0, err
    record = json.loads(stdout)
    assert record["text"] == "" and record["segments"] == [] and record["duration"] == 20.0
    assert "loading" not in err and fake_engine.loads == []


def test_no_vad_sends_fixed_pieces_covering_the_file(asr, fake_engine, long_recording, tmp_path):
    recording, _ = long_recording
    code, stdout, err = asr("asr", recording, "--no-vad", "-f", "json", *FAST)
    assert code == 0, err
    record = json.loads(stdout)
    segments = record["segments"]
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == record["duration"]
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))  # contiguous pieces
    assert len(segments) == 3 and all(0 < s["end"] - s["start"] <= 30.0 for s in segments)
    sent = [n for call in fake_engine.of_kind("transcribe") for n in call.options["samples"]]
    assert sum(sent) / 16000 == pytest.approx(record["duration"], abs=1e-3)  # every sample went to the model, once


@pytest.mark.parametrize("language", ["auto", "zh"])
def test_translate_records_the_language_and_sends_the_translate_prompt(asr, fake_engine, speech, language):
    from minicpmo_cli.api import asr as asr_api

    code, stdout, err = asr("-v", "asr", speech["one"], "--task", "translate", "--language", language, "-f", "json",
                            *FAST)
    prompts_sent = [i for call in fake_engine.of_kind("transcribe") for i in call.options["instructions"]]
    assert code == 0, err
    record = json.loads(stdout)
    assert record["language"] in ("en", "zh") and (language == "auto" or record["language"] == language)
    assert f"{speech['one']}: language {record['language']}, {len(record['segments'])} segment(s)" in err
    translate, english = asr_api.TRANSLATE_PROMPT + "\n", asr_api.task_prompt("transcribe", "en")
    if language == "zh":
        assert set(prompts_sent) == {translate}
    else:  # the probe with the English prompt first; a Chinese answer then gets the translation prompt
        assert prompts_sent[0] == english
        assert set(prompts_sent[1:]) <= ({translate} if record["language"] == "zh" else {english})
