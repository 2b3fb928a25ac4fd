"""`minicpmo chat` end to end on the tiny checkpoint: one-shot, images, stdin, few-shot, errors, the REPL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "6"]


def run_cli(*args, stdin: str | None = None):
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "minicpmo_cli", *map(str, args)], capture_output=True,
                          text=True, input=stdin if stdin is not None else "", env=env, timeout=300)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli import api

    return api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), tts=False)


def library_answer(engine, content: list, **decode):
    from minicpmo_cli.api.engine import DecodeOptions

    options = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)
    return engine.generate([{"role": "user", "content": content}], options)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("img") / "pic.png"
    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).ellipse((50, 40, 250, 160), fill="red")
    image.save(path)
    return path


def test_one_shot_prints_the_models_answer(tiny_ckpt, engine):
    result = run_cli("--model", tiny_ckpt, "chat", "What is the capital of France?", *GREEDY, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = library_answer(engine, ["What is the capital of France?"])
    assert result.stdout == expected + "\n"


def test_images_and_stdin_are_part_of_the_question(tiny_ckpt, engine, picture):
    from minicpmo_cli.media.image import load_image

    result = run_cli("--model", tiny_ckpt, "chat", "Describe it.", "-i", picture, "-i", picture, *GREEDY,
                     stdin="some notes")
    assert result.returncode == 0, result.stderr
    image = load_image(picture)
    expected = library_answer(engine, [image, image, "some notes\n\nDescribe it."])
    assert result.stdout == expected + "\n"


def test_few_shot_examples(tiny_ckpt, engine, picture):
    from minicpmo_cli.media.image import load_image

    result = run_cli("--model", tiny_ckpt, "chat", "production date", "--example", picture, "2023.08.04",
                     *GREEDY)
    assert result.returncode == 0, result.stderr
    image = load_image(picture)
    from minicpmo_cli.api.engine import DecodeOptions

    msgs = [{"role": "user", "content": [image, "production date"]},
            {"role": "assistant", "content": ["2023.08.04"]},
            {"role": "user", "content": ["production date"]}]
    options = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)
    assert result.stdout == engine.generate(msgs, options) + "\n"


def test_missing_image_is_one_line_naming_it(tiny_ckpt, tmp_path):
    missing = tmp_path / "nope.png"
    result = run_cli("--model", tiny_ckpt, "chat", "hi", "-i", missing)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("minicpmo: error")]
    assert len(lines) == 1 and str(missing) in lines[0]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    result = run_cli("--model", tmp_path / "absent", "chat", "hi")
    assert result.returncode == 1
    assert "absent" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tiny_ckpt, tmp_path):
    result = run_cli("--debug", "--model", tiny_ckpt, "chat", "hi", "-i", tmp_path / "nope.png")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_repl_session_through_a_terminal(tiny_ckpt, picture, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    saved = tmp_path / "conversation.json"
    child = pexpect.spawn(sys.executable, ["-m", "minicpmo_cli", "--model", str(tiny_ckpt), "chat",
                                           "--max-new-tokens", "4"],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("/help")
    child.expect("/image PATH")
    child.expect(">>> ")
    child.sendline(f"/image {picture}")
    child.expect("attached")
    child.expect(">>> ")
    child.sendline("What is this?")
    child.expect(">>> ")
    child.sendline('"""first line')
    child.expect(r"\.\.\. ")
    child.sendline('second line"""')
    child.expect(">>> ")
    child.sendline("/bogus")
    child.expect("unknown command")
    child.sendline(f"/save {saved}")
    child.expect("saved to")
    child.expect(">>> ")
    child.sendline("/clear")
    child.expect("cleared")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    data = json.loads(saved.read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    first = data["messages"][0]["content"]
    assert first[0] == {"type": "image", "path": str(picture)}
    assert first[1] == {"type": "text", "text": "What is this?"}
    assert data["messages"][2]["content"] == [{"type": "text", "text": "first line\nsecond line"}]


def test_repl_ctrl_c_stops_an_answer_and_keeps_the_session(tiny_ckpt):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "minicpmo_cli", "--model", str(tiny_ckpt), "chat",
                                           "--max-new-tokens", "100000", "--min-new-tokens", "100000"],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("Tell me a very long story.")
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _read_wav(path):
    import soundfile

    info = soundfile.info(str(path))
    return info


def test_speak_writes_the_spoken_answer(tiny_ckpt, tmp_path):
    target = tmp_path / "answer.wav"
    result = run_cli("--model", tiny_ckpt, "--seed", "7", "chat", "Say hello.", "--speak", target,
                     "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != "" or result.stdout == "\n"
    info = _read_wav(target)
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames > 0
    assert not list(tmp_path.glob("*.tmp*")), "no temp files left behind"


def test_speak_into_a_missing_folder_is_one_line(tiny_ckpt, tmp_path):
    target = tmp_path / "no" / "such" / "answer.wav"
    result = run_cli("--model", tiny_ckpt, "chat", "Say hello.", "--speak", target, "--max-new-tokens", "4")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(target.parent) in result.stderr


def test_repl_speak_on_loads_speech_and_writes_numbered_files(tiny_ckpt, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "minicpmo_cli", "--model", str(tiny_ckpt), "chat",
                                           "--max-new-tokens", "4"], cwd=str(tmp_path),
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=180)
    child.expect(">>> ")
    child.sendline("/speak on")
    child.expect(r"\[speaking on\]")
    child.expect(">>> ")
    for _ in range(2):
        child.sendline("Hello there.")
        child.expect(r"\[spoken into ")
        child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    for name in ("answer.wav", "answer-2.wav"):
        info = _read_wav(tmp_path / name)
        assert (info.samplerate, info.channels) == (24000, 1) and info.frames > 0


def test_speak_in_a_saved_voice(tiny_ckpt, tmp_path):
    import numpy as np
    import soundfile

    clip = tmp_path / "ref.wav"
    t = np.arange(16000 * 2) / 16000
    soundfile.write(str(clip), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    target = tmp_path / "voiced.wav"
    result = run_cli("--model", tiny_ckpt, "chat", "Say hello.", "--speak", target, "--voice", clip,
                     "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    info = _read_wav(target)
    assert info.samplerate == 24000 and info.frames > 0
    bad = run_cli("--model", tiny_ckpt, "chat", "Say hello.", "--voice", clip)
    assert bad.returncode == 2 and "--speak" in bad.stderr


def test_history_survives_an_answer_with_marker_tokens(engine):
    from minicpmo_cli.api.chat import Conversation
    from minicpmo_cli.api.engine import DecodeOptions

    conversation = Conversation()
    conversation.ask("Hi.")
    conversation.answer("a <image> b </slice> c")
    assert conversation.turns[-1].parts == ["a  b  c"]
    conversation.ask("And then?")
    answer = engine.generate(conversation.messages(), DecodeOptions(sampling=False, num_beams=1, max_new_tokens=3))
    assert isinstance(answer, str)


def test_repl_reports_a_failed_answer_and_goes_on(tiny_ckpt):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "minicpmo_cli", "--model", str(tiny_ckpt), "chat",
                                           "--max-new-tokens", "3"],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("what is <image> here")  # a literal marker the processor cannot pair
    child.expect("error: ")
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_speak_path_and_media_are_checked_before_the_model_loads(tmp_path):
    # --model points nowhere: a failure about the model would mean the inputs were checked too late.
    absent_model = tmp_path / "no-model"
    existing = tmp_path / "answer.wav"
    existing.write_bytes(b"RIFF")
    result = run_cli("--model", absent_model, "chat", "hi", "--speak", existing)
    assert result.returncode == 1 and "--overwrite" in result.stderr and "no-model" not in result.stderr
    result = run_cli("--model", absent_model, "chat", "hi", "-i", tmp_path / "missing.png")
    assert result.returncode == 1 and "missing.png" in result.stderr and "no-model" not in result.stderr
