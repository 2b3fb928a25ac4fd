"""`minicpmo chat`: one-shot, images, stdin, few-shot, errors, --speak and the REPL (scripted input).

The behaviour tests run in-process on the fake engine (tests/fake_engine.py): its answer says what it was
asked (``echo: TEXT [images: N, audio: M]``), and the calls it records say which messages and options
reached it. The real model on the tiny checkpoint keeps a subprocess smoke test (the answer equals the
library's), a failed answer in the REPL, and Ctrl-C on a real terminal.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import soundfile

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "6"]


@pytest.fixture
def chat(cli, fake_engine, tiny_ckpt):
    """`minicpmo --model TINY chat ...` on the fake engine."""
    return cli.with_args("--model", tiny_ckpt, "chat")


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli import api

    return api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu"), tts=False)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("img") / "pic.png"
    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).ellipse((50, 40, 250, 160), fill="red")
    image.save(path)
    return path


def sine_clip(path, seconds: float = 2.0):
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return path


def same_image(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------ the real model
def test_one_shot_prints_the_models_answer(tiny_ckpt, engine, cli_process):
    """The real `python -m minicpmo_cli` on the tiny model: stdout is the library's answer, byte for byte."""
    from minicpmo_cli.api.engine import DecodeOptions

    result = cli_process("--model", tiny_ckpt, "chat", "What is the capital of France?", *GREEDY, "--device", "cpu")
    assert result.code == 0, result.stderr
    options = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)
    expected = engine.generate([{"role": "user", "content": ["What is the capital of France?"]}], options)
    assert result.stdout == expected + "\n"


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


def test_repl_reports_a_failed_answer_and_goes_on(cli, tiny_ckpt):
    """A literal marker the real processor cannot pair fails that answer only; the session goes on."""
    result = cli("--model", tiny_ckpt, "--device", "cpu", "chat", "--max-new-tokens", "3",
                 stdin="what is <image> here\nhello\n/exit\n", tty=True)
    assert result.code == 0, result.stderr
    after_error = result.stdout.split("error: ", 1)[1]
    assert after_error.count(">>> ") == 2  # "hello" was answered, then /exit


def test_repl_ctrl_c_stops_an_answer_and_keeps_the_session(tiny_ckpt):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "minicpmo_cli", "--model", str(tiny_ckpt), "chat",
                                           "--max-new-tokens", "4000", "--min-new-tokens", "4000"],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("Tell me a very long story.")
    # Wait for a state, not a clock: the line is read (its echo ends with the newline) and the answer has
    # printed its first character. A Ctrl-C sent while the line is still being typed would cancel the line
    # at the prompt instead (as in any shell), and no answer would start.
    child.expect(r"story\.\r?\n")
    child.expect(r"\S")
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_while_the_stream_thread_starts_stops_that_thread(engine, monkeypatch):
    """A Ctrl-C that lands inside Thread.start() (before the stream loop's try) must still stop the generation
    thread: when the KeyboardInterrupt reaches the caller, the thread has ended."""
    import threading

    from minicpmo_cli.api.engine import DecodeOptions

    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start_then_interrupt(self):
        real_start(self)
        started.append(self)
        raise KeyboardInterrupt

    options = DecodeOptions(sampling=True, max_new_tokens=100000, min_new_tokens=100000, seed=1)
    # the plain path's thread (a threaded LLM engine is read in the caller's thread: tests/model/test_text_stream.py)
    monkeypatch.setattr(engine, "llm_engine", None)
    stream = engine.text_pieces([{"role": "user", "content": ["Tell me a story."]}], options)
    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    started = [thread for thread in started if thread.name != "minicpmo-engine"]
    monkeypatch.undo()
    [thread] = started
    assert not thread.is_alive()  # stopped and joined, not generating 100000 tokens in the background


# ------------------------------------------------------------------------------------ the fake engine
def test_one_shot_streams_the_answer_and_passes_the_options(chat, fake_engine):
    code, out, err = chat("What is the capital of France?", *GREEDY)
    assert code == 0, err
    assert out == "echo: What is the capital of France? [images: 0, audio: 0]\n"
    [load] = fake_engine.loads
    assert load.towers == {"vision": False, "audio": False, "tts": False}
    [call] = fake_engine.of_kind("generate")
    assert call.msgs == [{"role": "user", "content": ["What is the capital of France?"]}]
    decode = call.decode
    assert (decode.sampling, decode.num_beams, decode.repetition_penalty, decode.max_new_tokens) == (False, 1, 1.0, 6)


def test_sampling_options_and_the_seed_reach_the_engine(chat, fake_engine):
    code, _, err = chat("Hi.", "--sampling", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "7",
                        "--max-new-tokens", "12", "--min-new-tokens", "2", "--seed", "42")
    assert code == 0, err
    decode = fake_engine.last.decode
    assert (decode.sampling, decode.temperature, decode.top_p, decode.top_k) == (True, 0.5, 0.9, 7)
    assert (decode.max_new_tokens, decode.min_new_tokens) == (12, 2)
    assert fake_engine.last.seed == 42


def test_sampling_with_beams_is_a_usage_error(chat, fake_engine):
    code, _, err = chat("Hi.", "--sampling", "--num-beams", "4")
    assert code == 2 and "--num-beams" in err and len(err.strip().splitlines()) == 1, err
    assert fake_engine.calls == []


def test_images_and_stdin_are_part_of_the_question(chat, fake_engine, picture):
    from minicpmo_cli.media.image import load_image

    code, out, err = chat("Describe it.", "-i", picture, "-i", picture, *GREEDY, stdin="some notes")
    assert code == 0, err
    assert out == "echo: some notes\n\nDescribe it. [images: 2, audio: 0]\n"
    assert fake_engine.loads[0].towers["vision"] is True
    [message] = fake_engine.last.msgs
    image = load_image(picture)
    assert [same_image(p, image) for p in message["content"][:2]] == [True, True]
    assert message["content"][2] == "some notes\n\nDescribe it."


def test_few_shot_examples(chat, fake_engine, picture):
    from minicpmo_cli.media.image import load_image

    code, out, err = chat("production date", "--example", picture, "2023.08.04", *GREEDY)
    assert code == 0, err
    assert out == "echo: production date [images: 1, audio: 0]\n"
    msgs = fake_engine.last.msgs
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert same_image(msgs[0]["content"][0], load_image(picture)) and msgs[0]["content"][1] == "production date"
    assert msgs[1]["content"] == ["2023.08.04"] and msgs[2]["content"] == ["production date"]


def test_missing_image_is_one_line_naming_it(chat, fake_engine, tmp_path):
    missing = tmp_path / "nope.png"
    code, _, err = chat("hi", "-i", missing)
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("minicpmo: error")]
    assert len(lines) == 1 and str(missing) in lines[0]
    assert fake_engine.loads == []  # media are read before the model loads


def test_missing_model_folder_is_a_clear_error(cli, fake_engine, tmp_path):
    code, _, err = cli("--model", tmp_path / "absent", "chat", "hi")
    assert code == 1 and "absent" in err and "Traceback" not in err
    assert fake_engine.loads == []


def test_debug_shows_the_traceback(cli, tiny_ckpt, tmp_path):
    code, _, err = cli("--debug", "--model", tiny_ckpt, "chat", "hi", "-i", tmp_path / "nope.png")
    assert code == 1 and "Traceback" in err


def read_wav_info(path):
    info = soundfile.info(str(path))
    return info.samplerate, info.channels, info.subtype, info.frames


def test_speak_writes_the_spoken_answer(chat, fake_engine, tmp_path):
    target = tmp_path / "answer.wav"
    code, out, err = chat("Say hello.", "--speak", target, "--max-new-tokens", "6")
    assert code == 0, err
    assert out == "echo: Say hello. [images: 0, audio: 0]\n"
    rate, channels, subtype, frames = read_wav_info(target)
    assert (rate, channels, subtype) == (24000, 1, "PCM_16")
    assert frames == 4 * 512 * len("echo: Say hello. [images: 0, audio: 0]")  # the fake's speech of the answer
    assert fake_engine.loads[0].towers["tts"] is True
    call = fake_engine.last
    assert call.options["generate_audio"] and call.options["use_tts_template"]
    assert not list(tmp_path.glob("*.tmp*")), "no temp files left behind"


def test_speak_into_a_missing_folder_is_one_line(chat, fake_engine, tmp_path):
    target = tmp_path / "no" / "such" / "answer.wav"
    code, _, err = chat("Say hello.", "--speak", target)
    assert code == 1 and "Traceback" not in err and str(target.parent) in err
    assert fake_engine.loads == []


def test_speak_in_a_saved_voice(chat, fake_engine, tmp_path):
    from minicpmo_cli.media.audio import load_audio

    clip = sine_clip(tmp_path / "ref.wav")
    target = tmp_path / "voiced.wav"
    code, out, err = chat("Say hello.", "--speak", target, "--voice", clip, "--max-new-tokens", "4")
    assert code == 0, err
    assert out == "echo: Say hello. [images: 0, audio: 1]\n"  # the voice clip is in the prompt
    assert read_wav_info(target)[:2] == (24000, 1)
    assert np.array_equal(fake_engine.last.msgs[0]["content"][1], load_audio(clip))
    code, _, err = chat("Say hello.", "--voice", clip)
    assert code == 2 and "--speak" in err


def test_speak_path_and_media_are_checked_before_the_model_loads(cli, fake_engine, tmp_path):
    # --model points nowhere: a failure about the model would mean the inputs were checked too late.
    absent_model = tmp_path / "no-model"
    existing = tmp_path / "answer.wav"
    existing.write_bytes(b"RIFF")
    code, _, err = cli("--model", absent_model, "chat", "hi", "--speak", existing)
    assert code == 1 and "--overwrite" in err and "no-model" not in err
    code, _, err = cli("--model", absent_model, "chat", "hi", "-i", tmp_path / "missing.png")
    assert code == 1 and "missing.png" in err and "no-model" not in err
    assert fake_engine.loads == []


# ------------------------------------------------------------------------------------ the REPL (scripted)
def test_repl_session(chat, fake_engine, picture, tmp_path):
    saved = tmp_path / "conversation.json"
    script = ["/help", f"/image {picture}", "What is this?", '"""first line', 'second line"""', "/bogus",
              f"/save {saved}", "/clear", "After clearing."]
    code, out, err = chat("--max-new-tokens", "4", stdin="\n".join(script) + "\n", tty=True)
    assert code == 0, err  # Ctrl-D (the end of the script) leaves
    assert "/image PATH" in out and "[loading the vision model]" in out and "attached]" in out
    assert "echo: What is this? [images: 1, audio: 0]" in out
    assert "echo: first line\nsecond line [images: 1, audio: 0]" in out  # the image stays in the history
    assert "unknown command /bogus" in out and "saved to" in out and "[conversation cleared]" in out
    assert "echo: After clearing. [images: 0, audio: 0]" in out
    assert out.count(">>> ") == 9 and "... " in out  # a prompt per message read (and at the end), "... " within one
    assert fake_engine.loads[0].towers == {"vision": False, "audio": False, "tts": False}
    assert [c.options["towers"] for c in fake_engine.of_kind("ensure_towers")] == [["vision"]]
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    first = data["messages"][0]["content"]
    assert first[0] == {"type": "image", "path": str(picture)}
    assert first[1] == {"type": "text", "text": "What is this?"}
    assert data["messages"][1]["content"] == [{"type": "text", "text": "echo: What is this? [images: 1, audio: 0]"}]
    assert data["messages"][2]["content"] == [{"type": "text", "text": "first line\nsecond line"}]


def test_repl_ctrl_c_before_the_answer_starts_keeps_the_session(chat, fake_engine, monkeypatch, tmp_path):
    """Ctrl-C between reading the line and the first piece of the answer (here: while the question is put in
    the history) stops that message only; the session goes on and the stopped exchange is not kept."""
    from minicpmo_cli.api.chat import Conversation

    real_ask = Conversation.ask

    def ask(self, text):
        if text == "interrupted":
            real_ask(self, text)
            raise KeyboardInterrupt
        return real_ask(self, text)

    monkeypatch.setattr(Conversation, "ask", ask)
    saved = tmp_path / "c.json"
    code, out, err = chat("--max-new-tokens", "4", stdin=f"interrupted\nafter\n/save {saved}\n", tty=True)
    assert code == 0, err
    assert "[stopped]" in out and "echo: after [images: 0, audio: 0]" in out
    texts = [m["content"][0]["text"] for m in json.loads(saved.read_text())["messages"]]
    assert texts == ["after", "echo: after [images: 0, audio: 0]"]


def test_repl_stopped_answers_are_not_kept(chat, fake_engine, monkeypatch, tmp_path):
    """Ctrl-C while an answer streams: the partial answer (and its question) leave the history."""
    from tests.fake_engine import FakeEngine

    real_pieces = FakeEngine.text_pieces

    def text_pieces(self, msgs, settings, **kwargs):
        for number, piece in enumerate(real_pieces(self, msgs, settings, **kwargs)):
            if "stop me" in str(msgs[-1]["content"]) and number == 2:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(FakeEngine, "text_pieces", text_pieces)
    saved = tmp_path / "c.json"
    code, out, err = chat("--sampling", "--max-new-tokens", "9", stdin=f"first\nstop me now\nlast\n/save {saved}\n",
                          tty=True)
    assert code == 0, err
    assert "echo: stop [stopped]" in out
    texts = [m["content"][0]["text"] for m in json.loads(saved.read_text())["messages"]]
    assert texts == ["first", "echo: first [images: 0, audio: 0]", "last", "echo: last [images: 0, audio: 0]"]


def test_spoken_answer_comes_before_the_line_naming_its_file(chat, fake_engine, tmp_path):
    target = tmp_path / "a.wav"
    code, out, err = chat("--device", "cpu", "Hi.", "--speak", target)
    assert code == 0, err
    assert out == "echo: Hi. [images: 0, audio: 0]\n" and err.endswith(f"speech written to {target}\n")
    code, out, err = chat("--speak", tmp_path / "b.wav", stdin="Hello.\n/exit\n", tty=True)
    assert code == 0, err
    assert "speech written" not in out + err  # the REPL's own line says it, after the answer
    assert out.index("echo: Hello.") < out.index(f"[spoken into {tmp_path / 'b.wav'}]")


def test_repl_speak_on_loads_speech_and_writes_numbered_files(chat, fake_engine, tmp_path):
    code, out, err = chat("--max-new-tokens", "4", stdin="/speak on\nHello there.\nHello again.\n/exit\n", tty=True)
    assert code == 0, err
    assert "[loading the speech model]" in out and "[speaking on]" in out
    assert out.count("[spoken into ") == 2
    assert [c.kind for c in fake_engine.calls].count("enable_tts") == 1
    for name, text in (("answer.wav", "Hello there."), ("answer-2.wav", "Hello again.")):
        rate, channels, _, frames = read_wav_info(name)  # in the working folder
        assert (rate, channels) == (24000, 1)
        assert frames == 4 * 512 * len(f"echo: {text} [images: 0, audio: 0]")


def test_repl_forgets_the_oldest_exchanges_when_the_context_is_full(chat, fake_engine, picture, tmp_path):
    """The tiny model reads 4096 tokens; one long message and its echo fill most of it. The oldest text-only
    exchange is forgotten with one line; the exchange holding the image stays (it is still talked about)."""
    saved = tmp_path / "c.json"
    long = {name: f"{name}:" + " word" * 900 for name in ("first", "second", "third")}
    script = [f"/image {picture}", "What is this?", long["first"], long["second"], long["third"], f"/save {saved}"]
    code, out, err = chat("--system", "Be brief.", "--max-new-tokens", "4", stdin="\n".join(script) + "\n", tty=True)
    assert code == 0, err
    notices = [line.removeprefix(">>> ") for line in out.splitlines() if "no longer fits" in line]
    assert notices == ["[the conversation no longer fits the model's context: forgot its 1 oldest exchange (the "
                       "system prompt and attached media are kept)]"] * 2, out
    assert "error" not in out
    # each notice comes just before the answer it made room for
    assert out.index(notices[0]) < out.index("echo: second:") < out.rindex(notices[1]) < out.index("echo: third:")
    data = json.loads(saved.read_text())
    assert data["system"] == "Be brief."
    texts = [" ".join(s.get("text", s["type"]) for s in m["content"]) for m in data["messages"]]
    assert [t.split(":")[0] for t in texts] == ["image What is this?", "echo", "third", "echo"]
    # the answer to "third" still saw the image: it was kept
    assert fake_engine.last.answer.endswith("[images: 1, audio: 0]")


def test_repl_says_clear_when_forgetting_is_not_enough(chat, fake_engine, picture, tmp_path):
    saved = tmp_path / "c.json"
    script = [f"/image {picture}", "What is this?", "short one", "huge:" + " word" * 3900, "still here?",
              f"/save {saved}"]
    code, out, err = chat("--max-new-tokens", "4", stdin="\n".join(script) + "\n", tty=True)
    assert code == 0, err
    [error] = [line for line in out.splitlines() if "error: " in line]
    assert "/clear" in error and "tokens, but the model reads at most 4096" in error
    assert "echo: still here? [images: 1, audio: 0]" in out  # the session goes on with its whole history
    texts = [m["content"][-1]["text"] for m in json.loads(saved.read_text())["messages"]]
    assert texts[:4] == ["What is this?", "echo: What is this? [images: 1, audio: 0]", "short one",
                         "echo: short one [images: 1, audio: 0]"]
