"""Faults and hostile inputs end cleanly, through the CLI (issue: reliability).

kill -9 mid-batch, two runs over one output folder, file names that are not UTF-8, permissions (as root too:
the child runs without CAP_DAC_OVERRIDE), prompts larger than the context, binary stdin, corrupt mp3.
Real processes on the tiny checkpoint where the process is the point (signals, concurrency, capabilities,
the bytes on stdout and on file descriptor 2); in-process on the fake engine where the fault is caught
before any model work.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from minicpmo_cli.outputs import TEXT_FORMATS
from minicpmo_cli.temp_files import is_temp_name
from tests.conftest import cli_command
from tests.conftest import run_cli_process as run_cli

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

FAST = ["--max-new-tokens", "2", "--batch-size", "1"]
# An exception's class name reaching the user (ours are plain sentences after "minicpmo: error:").
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b|Traceback")


@pytest.fixture
def fake_cli(cli, fake_engine, tiny_ckpt):
    """`minicpmo --model TINY --device cpu ...` in-process on the fake engine: for the faults that end before
    (or without) any model work."""
    return cli.with_args("--model", tiny_ckpt, "--device", "cpu")


def speak(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return speak("Hello there, this is a short test.", tmp_path_factory.mktemp("clip") / "clip.wav")


def folder_of(clip: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"s{i}.wav" for i in range(count)]
    for path in paths:
        shutil.copy(clip, path)
    return paths


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if is_temp_name(name) or name.endswith(".part"))


def assert_complete(out: Path, stems: list[str]) -> None:
    for stem in stems:
        for ext in TEXT_FORMATS:
            assert (out / f"{stem}.{ext}").is_file(), f"{stem}.{ext} missing"
        assert json.loads((out / f"{stem}.json").read_text())["path"].endswith(f"{stem}.wav")
        assert (out / f"{stem}.vtt").read_text().startswith("WEBVTT")


def die_while_writing(target: Path, stream: bool = False) -> None:
    """A process that opens one of our temp files for `target`, writes half of it and gets kill -9."""
    body = ("from minicpmo_cli.outputs import WavStreamWriter\nimport numpy as np\n"
            f"w = WavStreamWriter({str(target)!r}).__enter__(); w.write(np.zeros(2400, np.float32))\n"
            if stream else
            "from minicpmo_cli.temp_files import make_temp_file\nfrom pathlib import Path\n"
            f"fd, name = make_temp_file(Path({str(target)!r})); os.write(fd, b'half')\n")
    code = "import os, signal\n" + body + "os.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


# ------------------------------------------------------------------------------------ 1: kill -9, rerun
def test_kill_9_mid_batch_then_rerun_completes_and_leaves_no_temp_files(tiny_ckpt, clip, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    stems = [p.stem for p in folder_of(clip, inbox, 16)]  # enough files that the kill lands mid-batch
    # What a writer killed in the middle of a write leaves, in the output folder and among the inputs.
    out.mkdir()
    die_while_writing(out / "s3.txt")
    die_while_writing(inbox / "s99.wav", stream=True)
    assert len(leftovers(out)) == 1 and len(leftovers(inbox)) == 1
    planted_input = inbox / leftovers(inbox)[0]

    command = cli_command("--model", tiny_ckpt, "--device", "cpu", "asr", inbox, "-o", out, "-f", "all", *FAST)
    batch = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "s0.vtt").exists() and batch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        batch.send_signal(signal.SIGKILL)
    finally:
        batch.wait()
    assert batch.returncode == -signal.SIGKILL, "the batch ended before it could be killed"
    assert not all((out / f"{stem}.txt").exists() for stem in stems), "the batch was killed too late to test a rerun"

    rerun = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", inbox, "-o", out, "-f", "all", *FAST,
                    planted_input)
    assert rerun.code == 0, rerun.stderr
    assert_complete(out, stems)
    assert leftovers(out) == []  # the killed writers' temp files and the killed batch's claims are gone
    assert "temp file" in rerun.stderr  # the planted temp given as an input was refused, by name
    expected = {f"{stem}.{ext}" for stem in stems for ext in TEXT_FORMATS}
    assert set(os.listdir(out)) == expected  # nothing else: the temp files were never taken for inputs


def test_tts_rerun_sweeps_a_killed_stream_writers_part_file(fake_cli, tmp_path):
    target = tmp_path / "answer.wav"
    die_while_writing(target, stream=True)
    assert len(leftovers(tmp_path)) == 1 and not target.exists()
    code, _, err = fake_cli("tts", "Hi.", "-o", target, "--max-audio-seconds", "0.2")
    assert code == 0, err
    assert target.stat().st_size > 44 and leftovers(tmp_path) == []


def test_live_writers_temp_files_are_left_alone(tmp_path):
    from minicpmo_cli.temp_files import make_temp_file, sweep_temp_files

    descriptor, name = make_temp_file(tmp_path / "a.txt")  # ours, and we are alive
    os.close(descriptor)
    assert is_temp_name(os.path.basename(name))
    assert sweep_temp_files(tmp_path, force=True) == [] and os.path.exists(name)


# ------------------------------------------------------------------------------------ 8: concurrent runs
def test_two_concurrent_runs_do_each_input_once(tiny_ckpt, clip, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    stems = [p.stem for p in folder_of(clip, inbox, 6)]
    for extra in ([], ["--overwrite"]):  # a fresh folder, then both redoing everything in it
        command = cli_command("--model", tiny_ckpt, "--device", "cpu", "-v", "asr", inbox, "-o", out, "-f", "all",
                              *FAST, *extra)
        runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        results = [run.communicate(timeout=300) for run in runs]
        for run, (_, err) in zip(runs, results):
            assert run.returncode == 0, err.decode()
        done = Counter(line.split("transcribing ", 1)[1].strip() for _, err in results
                       for line in err.decode().splitlines() if line.startswith("transcribing "))
        assert sorted(Path(p).stem for p in done) == stems, extra  # every input, by one of the two runs
        assert set(done.values()) == {1}, (extra, done)  # and none by both
        assert_complete(out, stems)
        assert leftovers(out) == []


def test_a_claim_of_a_dead_run_is_taken_over(tmp_path):
    from minicpmo_cli.claims import claim_path, release, try_claim

    code = ("import os, signal\nfrom minicpmo_cli.claims import try_claim\n"
            f"try_claim({str(tmp_path / 'x')!r}); os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code])
    assert claim_path(tmp_path / "x").exists()  # left behind by the killed owner
    claim = try_claim(tmp_path / "x")  # ... and ours now
    holder = subprocess.run([sys.executable, "-c", code.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                                                "print('got it')")], capture_output=True)
    assert b"Claimed" in holder.stderr and b"got it" not in holder.stdout  # a live claim is not taken
    release(claim)
    assert not claim_path(tmp_path / "x").exists()
    again = try_claim(tmp_path / "x")
    assert claim_path(tmp_path / "x").read_text().startswith(f"{os.getpid()}@")  # it names its owner
    release(again)


# ------------------------------------------------------------------------------------ 2: non-UTF-8 names
def bytes_named_copies(clip: Path, folder: Path, names: list[bytes]) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [os.path.join(os.fsencode(folder), name) for name in names]
    try:
        for path in paths:
            with open(path, "wb") as handle:
                handle.write(clip.read_bytes())
    except (OSError, UnicodeError) as exc:
        pytest.skip(f"this file system refuses names that are not UTF-8 ({exc})")
    return paths


def test_file_names_that_are_not_utf8_round_trip(tiny_ckpt, clip, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inputs = bytes_named_copies(clip, inbox, [b"caf\xe9.wav", b"\xff\xfe-x.wav"])
    result = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", inbox, "-o", out, "-f", "json", *FAST)
    assert result.code == 0, result.stderr
    written = sorted(os.listdir(os.fsencode(out)))
    assert written == sorted([b"caf\xe9.json", b"\xff\xfe-x.json"])  # named from the same bytes
    for raw_input in inputs:
        output = os.path.join(os.fsencode(out), os.path.basename(raw_input)[:-4] + b".json")
        with open(output, "rb") as handle:
            record = json.loads(handle.read().decode("utf-8"))  # strict: the file is valid UTF-8
        assert "\ufffd" in record["path"]  # readable: each bad byte is U+FFFD
        assert base64.b64decode(record["path_bytes"]) == raw_input  # and lossless

    listed = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", *inputs, "-f", "jsonl", *FAST)
    assert listed.code == 0, listed.stderr
    lines = listed.stdout_bytes.decode("utf-8").splitlines()  # strict: stdout is valid UTF-8
    assert sorted(base64.b64decode(json.loads(line)["path_bytes"]) for line in lines) == sorted(inputs)
    several = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", *inputs, *FAST)
    assert several.code == 0 and several.stdout_bytes.decode("utf-8").count("==> ") == 2
    assert not CLASS_NAME.search(several.stderr)


def test_files_from_list_and_tts_output_with_such_names(tiny_ckpt, clip, tmp_path):
    (raw,) = bytes_named_copies(clip, tmp_path, [b"\xe9t\xe9.wav"])
    listing = tmp_path / "list.txt"
    listing.write_bytes(raw + b"\n")
    result = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", "--files-from", listing, "-o", tmp_path / "o",
                     *FAST)
    assert result.code == 0, result.stderr
    assert os.listdir(os.fsencode(tmp_path / "o")) == [b"\xe9t\xe9.txt"]
    wav = os.path.join(os.fsencode(tmp_path), b"sp\xe9ech.wav")
    spoken = run_cli("--model", tiny_ckpt, "--device", "cpu", "tts", "Hi.", "-o", wav, "--max-audio-seconds", "0.2")
    assert spoken.code == 0, spoken.stderr
    assert os.path.getsize(wav) > 44
    assert "sp\ufffdech.wav" in spoken.stderr_bytes.decode("utf-8")  # the message names it readably


# ------------------------------------------------------------------------------------ 3: permissions
def restricted(probe: Path) -> list[str]:
    """A command prefix under which file permissions apply: none for a normal user; for root, setpriv
    without the capabilities that let root read anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: chmod does not restrict root")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run(prefix + ["cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("chmod 000 does not restrict this user here")
    return prefix


def one_error_line_per(stderr: bytes | str, *names: str) -> None:
    text = stderr.decode("utf-8") if isinstance(stderr, bytes) else stderr  # strict: stderr is valid UTF-8
    lines = [line for line in text.splitlines() if line.startswith("minicpmo: error:")]
    for name in names:
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert not CLASS_NAME.search(text), text


def test_unreadable_files_and_folders_fail_alone_and_the_batch_goes_on(tiny_ckpt, clip, tmp_path):
    inbox = tmp_path / "in"
    folder_of(clip, inbox, 2)
    shutil.copy(clip, inbox / "noread.wav")
    (inbox / "locked").mkdir()
    shutil.copy(clip, inbox / "locked" / "deep.wav")
    (inbox / "noread.wav").chmod(0)
    (inbox / "locked").chmod(0)
    try:
        prefix = restricted(inbox / "noread.wav")
        result = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", inbox, "-r", "-o", tmp_path / "out",
                         "-f", "json", *FAST, prefix=prefix)
        assert result.code == 3, result.stderr
        one_error_line_per(result.stderr_bytes, "noread.wav: permission denied", "locked: cannot list this folder")
        assert sorted(os.listdir(tmp_path / "out")) == ["s0.json", "s1.json"]
        through = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", inbox / "locked" / "deep.wav",
                          inbox / "s0.wav", *FAST, prefix=prefix)
        assert through.code == 3, through.stderr
        one_error_line_per(through.stderr_bytes, "deep.wav: cannot reach it (permission denied)")
        for option in ("-i", "-a", "--video"):  # chat's media: unreadable is a runtime error (1), not usage (2)
            chat = run_cli("--model", tiny_ckpt, "chat", "hi", option, inbox / "noread.wav", prefix=prefix)
            assert chat.code == 1, chat.stderr
            one_error_line_per(chat.stderr_bytes, "noread.wav: permission denied")
        for args in (["tts", "--text-file", inbox / "noread.wav", "-o", tmp_path / "x.wav"],
                     ["tts", "hi", "-o", inbox / "locked" / "x.wav"],
                     ["clone", inbox / "locked" / "deep.wav", "hi", "-o", tmp_path / "y.wav"],
                     ["describe-video", inbox / "locked" / "v.mp4"], ["asr", "--files-from", inbox / "noread.wav"]):
            other = run_cli("--model", tiny_ckpt, *args, prefix=prefix)
            assert other.code == 1, (args, other.stderr)
            assert len(other.stderr.strip().splitlines()) == 1, other.stderr
            assert not CLASS_NAME.search(other.stderr)
    finally:
        (inbox / "locked").chmod(0o755)


def test_paths_through_a_file_or_a_symlink_loop_fail_alone(fake_cli, clip, tmp_path):
    """Works as root too: no permission bits involved."""
    good = folder_of(clip, tmp_path, 1)[0]
    os.symlink("loop", tmp_path / "loop")
    code, _, err = fake_cli("asr", good / "x.wav", tmp_path / "loop" / "y.wav", good, *FAST)
    assert code == 3, err
    one_error_line_per(err, "s0.wav/x.wav: a folder in this path is a file", "loop/y.wav: cannot reach it")
    code, _, err = fake_cli("chat", "hi", "-i", good / "x.png")
    assert code == 1
    one_error_line_per(err, "x.png: file not found")


# ------------------------------------------------------------------------------------ 5: nothing can hang
def assert_too_long(result, *words: str) -> None:
    code, _, err = result
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("minicpmo: error:")]
    assert len(lines) == 1 and "at most 4096" in lines[0], err  # the tiny model's max_position_embeddings
    for word in words:
        assert word in lines[0], err
    assert not CLASS_NAME.search(err) and "longer than the specified maximum" not in err, err


def test_a_1mb_prompt_on_stdin_is_refused_in_seconds(fake_cli, fake_engine):
    started = time.monotonic()
    assert_too_long(fake_cli("chat", "Summarise.", stdin=b"word " * 200_000), "the prompt is ", " tokens")
    assert time.monotonic() - started < 180
    assert fake_engine.of_kind("generate") == []  # measured with the real processor, refused before answering


def test_too_many_images_too_long_audio_or_video_are_refused_before_decoding(fake_cli, fake_engine, tmp_path):
    import numpy as np
    import soundfile
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    images = [arg for _ in range(70) for arg in ("-i", tmp_path / "red.png")]
    assert_too_long(fake_cli("chat", "Compare them.", *images))
    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 200, np.float32), 16000)  # 200 s: ~5000 tokens
    assert_too_long(fake_cli("chat", "What is this?", "-a", tmp_path / "long.wav"))
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (needed to make the test video)")
    video = tmp_path / "long.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=gray:s=32x32:r=1:d=90", "-f",
                    "lavfi", "-i", "sine=d=90", "-shortest", str(video)], check=True)
    for mode in (["--stream"], []):
        assert_too_long(fake_cli("omni", video, *mode), "90 one-second units")
    assert fake_engine.of_kind("generate") == []


# ------------------------------------------------------------------------------------ 6: binary stdin
@pytest.mark.parametrize("args", [["tts", "-", "-o", "{out}"], ["chat"], ["chat", "Summarise."],
                                  ["tts", "--text-file", "-", "-o", "{out}"], ["tts", "--text-file", "{wav}", "-o",
                                                                                "{out}"]])
def test_binary_input_where_text_is_expected_is_a_usage_error(fake_cli, fake_engine, clip, tmp_path, args):
    args = [a.format(out=tmp_path / "x.wav", wav=clip) for a in args]
    code, _, err = fake_cli(*args, stdin=clip.read_bytes())
    assert code == 2, err
    assert err.count("\n") == 1 and "not UTF-8 text" in err, err
    assert not (tmp_path / "x.wav").exists() and fake_engine.loads == []


# ------------------------------------------------------------------------------------ 7: no library noise
def test_corrupt_mp3_gives_exactly_our_lines_on_stderr(tiny_ckpt, clip, tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (needed to make the test mp3)")
    import random

    good = tmp_path / "good.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(clip), str(good)], check=True)
    data, rng = bytearray(good.read_bytes()), random.Random(1)
    for index in range(200, len(data), 97):  # scratched: every 97th byte garbled
        data[index] = rng.randrange(256)
    (tmp_path / "scratched.mp3").write_bytes(bytes(data))
    (tmp_path / "garbage.mp3").write_bytes(b"ID3" + bytes(rng.randrange(256) for _ in range(5000)))

    broken = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", tmp_path / "garbage.mp3", *FAST)
    assert broken.code == 1
    assert broken.stderr.splitlines() == [
        f"minicpmo: error: {tmp_path / 'garbage.mp3'}: corrupt or truncated audio file "
        "(Invalid data found when processing input)"]
    scratched = run_cli("--model", tiny_ckpt, "--device", "cpu", "asr", tmp_path / "scratched.mp3", *FAST)
    assert scratched.code == 0, scratched.stderr
    lines = scratched.stderr.splitlines()
    assert all(line.startswith(("warning: ", "minicpmo: error: ")) for line in lines), lines  # nothing but ours
    assert sum("scratched.mp3: " in line and "damaged audio packet" in line for line in lines) == 1, lines


# ------------------------------------------------------------------------------------ 8: a full disk
def full_disk(monkeypatch, folder: Path, calls: tuple[str, ...] = ("write", "fsync")) -> None:
    """Writes of file contents under ``folder`` fail with ENOSPC, as on a full disk: a file can still be
    created (creating it needs an inode, not a block), but ``os.write`` and the ``fsync`` that flushes a
    buffered file raise (``calls``: which of them). Other files (pytest's own) write as usual."""
    import errno

    real_write, real_fsync = os.write, os.fsync

    def under(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:
            return False

    def failing(real):
        def call(fd, *args):
            if under(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, *args)
        return call

    for name, real in (("write", real_write), ("fsync", real_fsync)):
        if name in calls:
            monkeypatch.setattr(os, name, failing(real))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to tell which file is written")
@pytest.mark.parametrize("calls", [("write", "fsync"), ("fsync",)], ids=["full", "fills-while-writing"])
def test_a_full_disk_leaves_no_empty_file_and_names_the_file(fake_cli, clip, tmp_path, monkeypatch, calls):
    """Full from the start (the run's claim on the first input fails), or filling up after the claims (the
    first output fails): one line naming the file, exit 1, and no empty or partial file left."""
    inputs = folder_of(clip, tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    full_disk(monkeypatch, out, calls)
    code, _, err = fake_cli("asr", *inputs, "-o", out, "-f", "all")
    assert code == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert "No space left on device" in err and str(out / "s0") in err, err
    assert leftovers(out) == [] and list(out.iterdir()) == []  # nothing written, not even an empty file
