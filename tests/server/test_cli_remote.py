"""`--server URL` (MINICPMO_SERVER): asr, chat, tts and clone through a running server give the same outputs
and exit codes as the same command run locally. Both run in-process through main() (as tests/cli do)."""

from __future__ import annotations

import pytest

from tests.server.conftest import API_KEY, need


@pytest.fixture
def cli(cli, tiny_ckpt, monkeypatch):
    """run(server, *args) -> (exit code, stdout, stderr) of `minicpmo --model <tiny> ARGS` in-process (the shared
    runner), through ``server`` (MINICPMO_SERVER) or locally when it is None."""
    monkeypatch.setenv("MINICPMO_API_KEY", API_KEY)
    local = cli.with_args("--model", tiny_ckpt, "--device", "cpu")

    def run(server, *args, **stdin):
        if server is None:
            monkeypatch.delenv("MINICPMO_SERVER", raising=False)
        else:
            monkeypatch.setenv("MINICPMO_SERVER", server.url)
        return local(*args, **stdin)

    return run


def test_asr_through_the_server_equals_local(server, cli, media_files, tmp_path):
    speech = need(media_files, "speech")
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("plain text, not audio")
    args = ["asr", speech, need(media_files, "mp3"), tmp_path / "missing.wav", not_audio, "-f", "jsonl",
            "--max-new-tokens", "6"]
    local, remote = cli(None, *args), cli(server, *args)
    assert local[0] == remote[0] == 3  # some inputs failed, the others were done
    assert local[1] == remote[1] and local[1].count("\n") == 4
    assert sorted(line for line in local[2].splitlines() if "error" in line) == \
        sorted(line for line in remote[2].splitlines() if "error" in line)
    for fmt in ("srt", "txt"):
        folders = [tmp_path / f"local-{fmt}", tmp_path / f"remote-{fmt}"]
        for where, folder in zip((None, server), folders):
            assert cli(where, "asr", speech, "-o", folder, "-f", fmt, "--max-new-tokens", "6")[0] == 0
        assert (folders[0] / f"speech.{fmt}").read_text() == (folders[1] / f"speech.{fmt}").read_text()


def test_chat_through_the_server_equals_local(server, cli, media_files, tmp_path):
    args = ["--seed", "7", "chat", "What is in this picture?", "-i", media_files["picture"],
            "--max-new-tokens", "6"]
    local, remote = cli(None, *args), cli(server, *args)
    assert local[0] == remote[0] == 0 and local[1] == remote[1] and local[1].strip()
    greedy = ["chat", "Hi", "--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0",
              "--max-new-tokens", "5", "-a", need(media_files, "speech")]
    assert cli(None, *greedy)[1] == cli(server, *greedy)[1]
    spoken = [tmp_path / "local.wav", tmp_path / "remote.wav"]
    runs = [cli(where, "--seed", "7", "chat", "Say hello.", "--speak", path, "--max-new-tokens", "4")
            for where, path in zip((None, server), spoken)]
    assert runs[0][0] == runs[1][0] == 0 and runs[0][1] == runs[1][1]
    assert spoken[0].read_bytes() == spoken[1].read_bytes()


def test_chat_repl_through_the_server(server, tiny_ckpt, cli, tmp_path):
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    expected = cli(server, "--seed", "7", "chat", "Hello?", "--max-new-tokens", "5")[1].strip()
    env = {**os.environ, "NO_COLOR": "1", "MINICPMO_SERVER": server.url, "MINICPMO_API_KEY": API_KEY,
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    child = pexpect.spawn(sys.executable, ["-m", "minicpmo_cli", "--model", str(tiny_ckpt), "--seed", "7", "chat",
                                           "--max-new-tokens", "5"], env=env, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("Hello?")
    child.expect(">>> ")
    assert expected in child.before.replace("\r", "")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_tts_and_clone_through_the_server_equal_local(server, cli, media_files, tmp_path):
    ref = need(media_files, "ref")
    jobs = {"tts": ["tts", "Hello there. How are you?"], "clone": ["clone", ref, "Read this in my voice."]}
    for name, args in jobs.items():
        outputs = [tmp_path / f"{name}-local.wav", tmp_path / f"{name}-remote.wav"]
        for where, path in zip((None, server), outputs):
            code, _, err = cli(where, "--seed", "3", *args, "-o", path, "--max-audio-seconds", "0.2")
            assert code == 0, err
        assert outputs[0].read_bytes() == outputs[1].read_bytes(), name
    assert cli(server, "tts", "Hi.", "-o", tmp_path / "tts-local.wav")[0] == 1  # exists: same refusal as local


def test_unreachable_server_is_one_line(cli, tmp_path):
    from tests.server.conftest import free_port

    class Nowhere:
        url = f"http://127.0.0.1:{free_port()}"

    code, _, err = cli(Nowhere, "tts", "Hi.", "-o", tmp_path / "x.wav")
    assert code == 1 and err.count("\n") == 1 and "cannot reach the server" in err


def test_chat_voices_and_videos_through_the_server_equal_local(server, cli, media_files, tmp_path):
    """chat --speak --voice NAME (a voice saved on this machine), --mode roleplay --voice CLIP, --video and
    describe-video: sent to the server as the local prompt would be, with the same answers and speech."""
    ref, video = need(media_files, "ref"), need(media_files, "video")
    assert cli(None, "voices", "add", "alice", ref)[0] == 0
    jobs = {"voice": ["chat", "Say hello.", "--voice", "alice"],
            "roleplay": ["chat", "Say hello.", "--mode", "roleplay", "--voice", ref]}
    for name, args in jobs.items():
        outputs = [tmp_path / f"{name}-local.wav", tmp_path / f"{name}-remote.wav"]
        runs = [cli(where, "--seed", "7", *args, "--speak", path, "--max-new-tokens", "4")
                for where, path in zip((None, server), outputs)]
        assert runs[0][0] == runs[1][0] == 0, runs
        assert runs[0][1] == runs[1][1] and runs[0][1].strip(), name
        assert outputs[0].read_bytes() == outputs[1].read_bytes(), name
    for args in (["chat", "What happens?", "--video", video], ["describe-video", video, "What happens?"],
                 ["describe-video", video, "What happens?", "--fps", "2", "--max-frames", "3"]):
        local, remote = (cli(where, "--seed", "7", *args, "--max-new-tokens", "5") for where in (None, server))
        assert local[0] == remote[0] == 0 and local[1] == remote[1] and local[1].strip(), (local, remote)
        assert "runs on this machine" not in remote[2]


def test_commands_without_a_route_say_they_run_here(server, cli, media_files, tmp_path):
    """mimick, omni and tts --stream: one line says they run locally (and why), and
    they give what the local command gives."""
    speech, video = need(media_files, "speech"), need(media_files, "video")
    jobs = {"mimick": ["mimick", speech, "--max-audio-seconds", "0.2"],
            "omni": ["omni", video, "--max-new-tokens", "3"],
            "tts --stream": ["tts", "Hello.", "--stream", "--max-audio-seconds", "0.2"]}
    for name, args in jobs.items():
        outputs = [tmp_path / f"{name.split()[0]}-{where}.wav" for where in ("local", "remote")]
        runs = []
        for where, path in zip((None, server), outputs):
            extra = ["-o", path] if name.startswith(("mimick", "omni", "tts")) else []
            runs.append(cli(where, "--seed", "3", *args, *extra))
        assert runs[0][0] == runs[1][0] == 0, runs
        assert runs[0][1] == runs[1][1], name
        notes = [line for line in runs[1][2].splitlines() if "runs on this machine" in line]
        assert len(notes) == 1 and notes[0].startswith(f"warning: {name} runs on this machine"), runs[1][2]
        assert "runs on this machine" not in runs[0][2]
        if extra:
            assert outputs[0].read_bytes() == outputs[1].read_bytes(), name


def test_repl_through_the_server_forgets_old_exchanges_when_the_context_is_full(server, cli, tmp_path):
    """The server's "prompt is too long" answer makes the REPL forget the oldest exchange, as locally."""
    saved = tmp_path / "c.json"
    script = [f"{name}:" + " word" * 700 for name in ("first", "second", "third", "fourth")] + [f"/save {saved}"]
    code, out, err = cli(server, "--seed", "7", "chat", "--max-new-tokens", "3", stdin="\n".join(script) + "\n",
                         tty=True)
    assert code == 0, err
    assert "error" not in out and "forgot its 1 oldest exchange" in out, out[-2000:]
    import json

    users = [m["content"][0]["text"].split(":")[0] for m in json.loads(saved.read_text())["messages"][::2]]
    assert users[-1] == "fourth" and "first" not in users
