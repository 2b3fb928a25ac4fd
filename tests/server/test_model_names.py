"""The model names a request may send, through the official `openai` client against real servers: the served
names (--served-model-name a,b), the checkpoint's hub id, and OpenAI's standard names on the routes of their
kind (whisper-1 on transcriptions, tts-1 on speech, gpt-4o on chat) unless --strict-model-names."""

from __future__ import annotations

import json

import openai
import pytest

from minicpmo_cli.server.models import checkpoint_hub_id, openai_kind
from tests.server.conftest import API_KEY, MODEL, need, start_server, stop_server

HUB_ID = "openbmb/MiniCPM-o-2_6"
SPEECH = {"input": "Hello there.", "voice": "alloy", "response_format": "wav",
          "extra_body": {"max_audio_seconds": 0.2, "seed": 3}}


def hub_cache_snapshot(ckpt, root):
    """``ckpt`` laid out as the hub cache holds a download: models--owner--name/snapshots/REV/ -> blobs."""
    repo = root / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    for source in ckpt.rglob("*"):
        if source.is_file():
            target = snapshot / source.relative_to(ckpt)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


@pytest.fixture(scope="module")
def strict_server(tiny_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("strict-server")
    snapshot = hub_cache_snapshot(tiny_ckpt, folder)
    running = start_server(snapshot, folder, "--served-model-name", "first, second,first", "--strict-model-names",
                           "--api-key", "test-key")
    yield running
    stop_server(running)


def chat(client, model):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, seed=5).choices[0].message.content


def transcribe(client, model, path):
    with open(path, "rb") as handle:
        return client.audio.transcriptions.create(model=model, file=handle, extra_body={"max_new_tokens": 4}).text


# ------------------------------------------------------------------------------------------ hub ids
def test_hub_id_from_the_cache_layout_the_config_or_the_name(tiny_ckpt, tmp_path):
    assert checkpoint_hub_id(HUB_ID) == HUB_ID
    assert checkpoint_hub_id(str(hub_cache_snapshot(tiny_ckpt, tmp_path))) == HUB_ID
    assert checkpoint_hub_id(str(tiny_ckpt)) is None  # its config says minicpmo26_tiny_random: no owner/name
    folder = tmp_path / "finetuned"
    folder.mkdir()
    for name_or_path, expected in (("openbmb/MiniCPM-o-2_6-int4", "openbmb/MiniCPM-o-2_6-int4"),
                                   (str(tmp_path), None), ("/data/ckpt/x", None), ("./x/y", None)):
        (folder / "config.json").write_text(json.dumps({"_name_or_path": name_or_path}))
        assert checkpoint_hub_id(str(folder)) == expected, name_or_path
    assert openai_kind("gpt-4o-realtime-preview-2024-12-17") == "realtime"
    assert openai_kind("whisper-1") == "transcription" and openai_kind("tiny") is None


# ------------------------------------------------------------ OpenAI's names (the default server)
def test_openai_names_work_on_the_routes_of_their_kind(server, media_files):
    client = server.client()
    speech = need(media_files, "speech")
    assert chat(client, "gpt-4o-mini") == chat(client, "gpt-4o") == chat(client, MODEL)
    expected = transcribe(client, MODEL, speech)
    assert transcribe(client, "whisper-1", speech) == transcribe(client, "gpt-4o-transcribe", speech) == expected
    wav = client.audio.speech.create(model=MODEL, **SPEECH).content
    assert client.audio.speech.create(model="tts-1", **SPEECH).content == wav
    assert client.audio.speech.create(model="gpt-4o-mini-tts", **SPEECH).content == wav
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    assert [m.id for m in client.models.list().data] == [MODEL]  # aliases are accepted, not listed


@pytest.mark.parametrize("route, model", [("chat", "whisper-1"), ("speech", "gpt-4o"), ("chat", "llama3"),
                                          ("transcription", "tts-1")])
def test_names_of_another_kind_or_unknown_are_404(server, media_files, route, model):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        if route == "chat":
            chat(client, model)
        elif route == "speech":
            client.audio.speech.create(model=model, **SPEECH)
        else:
            transcribe(client, model, need(media_files, "speech"))
    assert caught.value.code == "model_not_found" and repr(model) in caught.value.message
    assert repr(MODEL) in caught.value.message  # says what it takes


# ------------------------------------------- served names, the hub id, --strict-model-names
def test_served_names_and_the_hub_id_are_listed_and_accepted(strict_server):
    client = strict_server.client()
    assert [m.id for m in client.models.list().data] == ["first", "second", HUB_ID]
    assert chat(client, HUB_ID) == chat(client, "second") == chat(client, "first")
    assert client.models.retrieve(HUB_ID).id == HUB_ID


def test_strict_model_names_refuse_openai_names(strict_server, media_files):
    client = strict_server.client()
    for call in (lambda: chat(client, "gpt-4o"), lambda: client.models.retrieve("whisper-1"),
                 lambda: transcribe(client, "whisper-1", need(media_files, "speech"))):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "model_not_found" and "OpenAI" not in caught.value.message


def test_served_model_name_without_a_name_is_a_usage_error(cli):
    code, out, err = cli("serve", "--served-model-name", " , ")
    assert code == 2 and "--served-model-name" in err and len(err.strip().splitlines()) == 1


def test_realtime_takes_its_openai_names_and_refuses_others(server):
    """The realtime route accepts the served name and OpenAI's realtime names; a name of another kind is a 404
    answered at the handshake."""
    import json

    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    base = server.url.replace("http", "ws") + "/v1/realtime?model="
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for name in (MODEL, "gpt-4o-realtime-preview", "gpt-realtime"):
        with ws_client.connect(base + name, additional_headers=headers) as conn:
            assert json.loads(conn.recv(timeout=60))["type"] == "session.created"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(base + "whisper-1", additional_headers=headers)
    assert refused.value.response.status_code == 404
