"""`minicpmo describe-video` and `minicpmo omni` (normal and --stream) end to end on a tiny checkpoint and
generated mp4 files with and without sound: exit codes, stdout, the wav files, one-line errors, Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from minicpmo_cli.cli import app as app_module
from minicpmo_cli.cli import common

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")

# Registers the video commands unless app.py already does, then runs the CLI (same code path as `minicpmo`).
RUNNER = (
    "import sys\n"
    "from minicpmo_cli.cli import app, video\n"
    "if not any(c.name == 'omni' for c in app.app.registered_commands):\n"
    "    video.register(app.app)\n"
    "app.main(sys.argv[1:])\n"
)


def ensure_registered() -> None:
    from minicpmo_cli.cli import video

    if not any(c.name == "omni" for c in app_module.app.registered_commands):
        video.register(app_module.app)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    work = tmp_path_factory.mktemp("video_cli")
    ckpt = make_tiny_checkpoint(work / "ckpt")
    sound, silent = work / "sound.mp4", work / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=4", "-f", "lavfi",
           "-i", "sine=frequency=330:sample_rate=16000", "-t", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-shortest", str(sound))
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=4", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(silent))
    return {"ckpt": ckpt, "sound": sound, "silent": silent, "work": work}


@pytest.fixture(scope="module")
def engine(files):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(files["ckpt"]), device="cpu"), tts=True)


@pytest.fixture
def cli(files, engine, monkeypatch, capsys):
    """Run the CLI in this process with the model loaded once; returns (exit code, stdout, stderr)."""
    from minicpmo_cli.api.engine import Engine

    ensure_registered()

    def load_engine(**towers):
        # A fresh Engine over the shared weights, with this invocation's global options (--seed).
        return dataclasses.replace(engine, options=common.load_options(), towers=dict(engine.towers))

    monkeypatch.setattr(common, "load_engine", load_engine)
    assert isinstance(engine, Engine)

    def run(*args: str):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            app_module.main(["--model", str(files["ckpt"]), "--device", "cpu", *args])
        out = capsys.readouterr()
        return exit_info.value.code or 0, out.out, out.err

    return run


def read_wav(path: Path) -> tuple[int, int, int, int]:
    with wave.open(str(path)) as wav:
        return wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()


def run_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env,
                          timeout=600)


# ---------------------------------------------------------------------------------------------- real processes
def test_describe_video_in_a_real_process(files):
    result = run_subprocess("--model", str(files["ckpt"]), "describe-video", str(files["sound"]),
                            "What happens?", "--max-new-tokens", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert "Traceback" not in result.stderr


def test_omni_stream_with_speech_in_a_real_process(files, tmp_path):
    out = tmp_path / "answer.wav"
    result = run_subprocess("--model", str(files["ckpt"]), "omni", str(files["sound"]), "--stream", "-o", str(out),
                            "--max-new-tokens", "5", "--max-audio-seconds", "1", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    rate, channels, width, frames = read_wav(out)
    assert (rate, channels, width) == (24000, 1, 2)
    assert 0 < frames <= 24000
    assert [p.name for p in tmp_path.iterdir()] == ["answer.wav"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------- in process
def spy_generate(monkeypatch):
    """Record the messages and options each Engine.generate call gets."""
    from minicpmo_cli.api.engine import Engine

    calls = []
    original = Engine.generate

    def spy(self, msgs, decode, **kwargs):
        calls.append((msgs, decode, kwargs))
        return original(self, msgs, decode, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    return calls


def test_describe_video_frames_and_settings(cli, files, monkeypatch):
    from PIL import Image

    calls = spy_generate(monkeypatch)
    code, out, err = cli("describe-video", str(files["silent"]), "--max-frames", "2", "--fps", "4",
                         "--max-new-tokens", "4")
    assert code == 0, err
    assert out.strip()
    msgs, decode, options = calls[-1]
    content = msgs[0]["content"]
    assert sum(isinstance(c, Image.Image) for c in content) == 2  # 8 frames at 4 fps, thinned to 2
    assert not any(isinstance(c, np.ndarray) for c in content)  # silent: no audio part
    assert content[-1] == "Describe the video"
    assert options["use_image_id"] is False and options["max_slice_nums"] == 2
    assert decode.max_new_tokens == 4

    code, out, err = cli("describe-video", str(files["sound"]), "--max-new-tokens", "3", "--no-sampling")
    assert code == 0, err
    content = calls[-1][0][0]["content"]
    assert sum(isinstance(c, Image.Image) for c in content) == 3  # 1 fps over 3 s
    audio = [c for c in content if isinstance(c, np.ndarray)]
    assert len(audio) == 1 and abs(len(audio[0]) - 3 * 16000) < 1600


def test_omni_normal_text_and_speech(cli, files, monkeypatch, tmp_path):
    calls = spy_generate(monkeypatch)
    out_wav = tmp_path / "omni.wav"
    code, out, err = cli("omni", str(files["sound"]), "-o", str(out_wav), "--max-new-tokens", "5", "--seed", "1")
    assert code == 0, err
    assert out.strip() and out.endswith("\n")
    rate, channels, width, frames = read_wav(out_wav)
    assert (rate, channels, width) == (24000, 1, 2)
    assert frames > 0 and frames % 512 == 0  # whole TTS frames of 512 samples
    msgs, _, options = calls[-1]
    assert msgs[0]["content"][0].startswith("You are a helpful assistant.")
    units = msgs[1]["content"]
    assert units[0::3] == ["<unit>"] * 3 and all(len(a) == 16000 for a in units[2::3])
    assert options["omni_input"] and options["use_image_id"] is False and options["max_slice_nums"] == 1

    code, _, err = cli("omni", str(files["sound"]), "-o", str(out_wav))
    assert code == 1 and "--overwrite" in err and str(out_wav) in err  # never overwritten silently, as tts


def test_omni_silent_video_text_only_and_streaming(cli, files, monkeypatch):
    calls = spy_generate(monkeypatch)
    code, out, err = cli("omni", str(files["silent"]), "--max-new-tokens", "4")
    assert code == 0, err
    assert out.strip()
    units = calls[-1][0][1]["content"]
    assert len(units) == 6 and all(not a.any() for a in units[2::3])  # 2 units of silence

    first = cli("omni", str(files["silent"]), "Describe it.", "--stream", "--max-new-tokens", "6", "--seed", "7")
    again = cli("omni", str(files["silent"]), "Describe it.", "--stream", "--max-new-tokens", "6", "--seed", "7")
    assert first[0] == 0 and first[1].strip()
    assert first[1] == again[1]  # --seed makes the sampled answer repeatable


def test_omni_stream_keeps_a_valid_wav_on_ctrl_c(cli, files, monkeypatch, tmp_path):
    from minicpmo_cli.api import video as video_api

    def interrupted_stream(*args, **kwargs):
        yield video_api.OmniChunk(text="Hello", audio=np.full(12800, 0.25, dtype=np.float32))
        raise KeyboardInterrupt

    monkeypatch.setattr(video_api, "omni_stream", interrupted_stream)
    out_wav = tmp_path / "cut.wav"
    code, out, err = cli("omni", str(files["silent"]), "--stream", "-o", str(out_wav))
    assert code == 130
    assert out.startswith("Hello")
    assert read_wav(out_wav) == (24000, 1, 2, 12800)
    assert [p.name for p in tmp_path.iterdir()] == ["cut.wav"]


@pytest.mark.parametrize("command", ["describe-video", "omni"])
def test_bad_videos_give_one_line_errors(cli, files, command):
    work = files["work"]
    (work / "empty.mp4").write_bytes(b"")
    (work / "notes.mp4").write_text("this is not a video\n")
    (work / "cut.mp4").write_bytes(files["sound"].read_bytes()[:2000])
    for name in ("empty.mp4", "notes.mp4", "cut.mp4", "missing.mp4"):
        code, out, err = cli(command, str(work / name))
        assert code == 1, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and lines[0].startswith("minicpmo: error:"), err
        assert out == ""


def test_omni_usage_errors(cli, files, tmp_path):
    ref = tmp_path / "ref.wav"
    ref.write_bytes(b"")
    assert cli("omni", str(files["silent"]), "--ref", str(ref), "--voice", "x")[0] == 2
    assert cli("omni", str(files["silent"]), "--language", "fr")[0] == 2
    assert cli("describe-video", str(files["silent"]), "--max-frames", "0")[0] == 2
    assert cli("describe-video", str(files["silent"]), "--fps", "0")[0] == 2
    # An unknown voice is a missing input (exit 1, as for tts/clone), named in the one-line error.
    code, _, err = cli("omni", str(files["silent"]), "--voice", "nobody")
    assert code == 1 and "nobody" in err and "no voice profile" in err


def test_wav_stream_writer_is_valid_after_each_chunk_and_discards_on_error(tmp_path):
    from minicpmo_cli.outputs import WavStreamWriter

    target = tmp_path / "out.wav"
    with WavStreamWriter(target) as writer:
        for count in (1, 2):
            writer.write(np.zeros(2400, dtype=np.float32))
            (temp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
            assert read_wav(temp) == (24000, 1, 2, 2400 * count)  # header patched after each chunk
    assert read_wav(target) == (24000, 1, 2, 4800) and writer.seconds == pytest.approx(0.2)

    with pytest.raises(RuntimeError):
        with WavStreamWriter(tmp_path / "broken.wav") as writer:
            writer.write(np.ones(100, dtype=np.float32))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_chat_video_attachment_for_the_repl(files, engine):
    """What `chat`'s /video PATH calls: frames + the sound track go into the next user message."""
    from PIL import Image

    from minicpmo_cli.api.chat import Conversation, attach_video, reply
    from minicpmo_cli.api.engine import DecodeOptions

    conversation = Conversation()
    attach_video(conversation, files["sound"])
    parts = conversation.pending.parts
    assert sum(isinstance(p, Image.Image) for p in parts) == 3 and isinstance(parts[-1], np.ndarray)
    assert conversation.pending.sources == [{"type": "video", "path": str(files["sound"]), "frames": 3,
                                             "audio": True}]
    conversation.ask("What happens?")
    answer = "".join(reply(engine, conversation, DecodeOptions(max_new_tokens=3)))
    assert isinstance(answer, str) and answer
