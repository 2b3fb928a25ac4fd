"""`chat --mode assistant|roleplay|default` with a spoken question (-a), a voice and --speak, one-shot and in
the REPL: the model receives the guide's system prompt for the mode (checked in the messages that reach the
fake engine; the real processor's rendering of those prompts is tested with the model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

from tests.cli.ttyrun import noise_wav


@pytest.fixture
def seen(fake_engine):
    """The msgs of every answer the (fake) engine was asked for, in order."""

    class Seen:
        def __getitem__(self, index):
            return fake_engine.of_kind("generate")[index].msgs

    return Seen()


@pytest.fixture
def cli(cli, fake_engine, tiny_ckpt):
    """`minicpmo --model TINY --device cpu ...` in-process on the fake engine."""
    return cli.with_args("--model", tiny_ckpt, "--device", "cpu")


@pytest.fixture
def voice_and_question(tmp_path):
    t = np.arange(16000 * 2) / 16000
    voice = tmp_path / "character.wav"
    soundfile.write(voice, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return voice, noise_wav(tmp_path / "question.wav", 1.0)


@pytest.mark.parametrize("mode, guide_mode", [("roleplay", "audio_roleplay"), ("assistant", "audio_assistant")])
def test_spoken_question_answered_in_a_voice_with_the_modes_prompt(cli, seen, voice_and_question, tmp_path,
                                                                   mode, guide_mode):
    from minicpmo_cli.media.audio import load_audio
    from minicpmo_cli.processing.prompts import get_sys_prompt

    voice, question = voice_and_question
    out = tmp_path / "answer.wav"
    code, stdout, err = cli("chat", "--mode", mode, "--voice", voice, "-a", question, "--speak", out,
                            "--no-stdin", "--max-new-tokens", "4")
    assert code == 0, err
    assert soundfile.info(str(out)).samplerate == 24000 and soundfile.info(str(out)).frames > 0
    msgs = seen[-1]
    expected = get_sys_prompt(ref_audio=load_audio(voice), mode=guide_mode, language="en")
    assert msgs[0]["role"] == expected["role"]
    assert [p for p in msgs[0]["content"] if isinstance(p, str)] == [p for p in expected["content"]
                                                                      if isinstance(p, str)]
    assert np.array_equal(msgs[0]["content"][1], load_audio(voice))  # the voice clip inside the prompt
    assert msgs[1]["role"] == "user" and np.array_equal(msgs[1]["content"][0], load_audio(question))
    assert len(msgs) == 2 and stdout.endswith("\n")


def test_default_mode_has_no_voice_prompt_and_voice_without_a_mode_is_assistant(cli, seen, voice_and_question,
                                                                                tmp_path):
    from minicpmo_cli.processing.prompts import get_sys_prompt

    voice, question = voice_and_question
    code, _, err = cli("chat", "--mode", "default", "-a", question, "--no-stdin", "--max-new-tokens", "3")
    assert code == 0, err
    assert [m["role"] for m in seen[-1]] == ["user"]  # only the question
    code, _, err = cli("chat", "Hi.", "--voice", voice, "--speak", tmp_path / "a.wav", "--no-stdin",
                       "--max-new-tokens", "3")
    assert code == 0, err
    assistant = get_sys_prompt(ref_audio=np.zeros(1, np.float32), mode="audio_assistant", language="en")
    assert seen[-1][0]["content"][0] == assistant["content"][0]


@pytest.mark.parametrize("args, message", [
    (["--mode", "roleplay", "-a", "{q}", "--speak", "{out}"], "add --voice"),
    (["--mode", "default", "--voice", "{v}", "--speak", "{out}", "Hi."], "--mode assistant or roleplay"),
    (["--mode", "singing", "Hi."], "--mode must be one of"),
])
def test_mode_usage_errors_are_one_line(cli, voice_and_question, tmp_path, args, message):
    voice, question = voice_and_question
    args = [a.format(q=question, v=voice, out=tmp_path / "x.wav") for a in args]
    code, _, err = cli("chat", *args, "--no-stdin")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_repl_mode_voice_and_load(cli, seen, voice_and_question, tmp_path):
    voice, question = voice_and_question
    saved = tmp_path / "talk.json"
    script = ["/mode roleplay", f"/voice {voice}", f"/audio {question}", "Who are you?", f"/save {saved}", "/clear",
              f"/load {saved}", f"/save {tmp_path / 'again.json'}", "/load nowhere.json", "/exit"]
    code, out, err = cli("chat", "--max-new-tokens", "3", stdin="\n".join(script) + "\n", tty=True)
    assert code == 0, err
    assert "[mode roleplay; set a voice: /voice V]" in out
    assert f"[voice {voice}, mode roleplay]" in out and "attached]" in out
    assert "echo: Who are you? [images: 0, audio: 2]" in out  # the voice clip and the question
    assert "saved to" in out and "[conversation cleared]" in out
    assert f"[loaded 2 messages from {saved}]" in out and "nowhere.json: no such file" in out
    assert seen[-1][0]["content"][0] == roleplay_prompt_text()

    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0] == {"type": "audio", "path": str(question)}
    assert (tmp_path / "again.json").read_text() == saved.read_text()  # /load restored the conversation


def roleplay_prompt_text() -> str:
    from minicpmo_cli.processing.prompts import get_sys_prompt

    return get_sys_prompt(ref_audio=np.zeros(1, np.float32), mode="audio_roleplay", language="en")["content"][0]
