"""/v1/chat/completions and /v1/models through the official `openai` client against a real server.

The tiny model has random weights: its answers are noise, so every answer is compared with what the library
(`minicpmo_cli.api.chat`) answers for the same conversation in this process. temperature 0 is greedy.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from tests.server.conftest import MODEL, need
from tests.server.security_support import open_server  # noqa: F401 - a fixture


def library_answer(engine, build, max_tokens: int) -> str:
    from minicpmo_cli.api.chat import Conversation, reply
    from minicpmo_cli.api.engine import DecodeOptions

    conversation = Conversation()
    build(conversation)
    decode = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.05, max_new_tokens=max_tokens)
    return "".join(reply(engine, conversation, decode))


def data_url(path, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def ask(client, content, **kwargs):
    kwargs.setdefault("max_tokens", 6)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_list_the_served_model(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_text_answer_equals_the_library_with_real_usage(server, engine):
    answer = ask(server.client(), "What is the capital of France?")
    expected = library_answer(engine, lambda c: c.ask("What is the capital of France?"), 6)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 6  # max_tokens reached: six forward passes
    prompt = engine.processor.apply_chat_template(
        msgs=[{"role": "user", "content": ["What is the capital of France?"]}])
    assert answer.usage.prompt_tokens == prompt["input_ids"].shape[-1]
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6


def test_stream_gives_the_same_answer_in_pieces_then_usage(server):
    client = server.client()
    whole = ask(client, "Tell me a story.", max_tokens=8).choices[0].message.content
    chunks = list(ask(client, "Tell me a story.", max_tokens=8, stream=True,
                      stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # how many pieces depends on how far the engine got before the reader woke (one piece holds all the ids
    # read since the last): the text is what must match
    assert pieces and "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stop_cuts_the_answer_before_the_stop_string(server):
    client = server.client()
    whole = ask(client, "Count.", max_tokens=8).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut = ask(client, "Count.", max_tokens=8, stop=[stop])
    assert cut.choices[0].message.content == whole[:whole.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, "Count.", max_tokens=8, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[:whole.find(stop)]


def test_seeded_sampling_is_repeatable(server):
    client = server.client()
    first = ask(client, "Hi", temperature=0.9, top_p=0.9, seed=5, max_tokens=8).choices[0].message.content
    again = ask(client, "Hi", temperature=0.9, top_p=0.9, seed=5, max_tokens=8).choices[0].message.content
    assert first == again


def test_image_data_url_and_http_url(server, open_server, engine, media_files):
    import http.server
    import threading

    picture = media_files["picture"]
    content = [{"type": "image_url", "image_url": {"url": data_url(picture)}},
               {"type": "text", "text": "What is in this picture?"}]
    answer = ask(server.client(), content).choices[0].message.content

    def build(conversation):
        conversation.attach_image(picture)
        conversation.ask("What is in this picture?")

    assert answer == library_answer(engine, build, 6)

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(picture.parent), **k)  # noqa
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{picture.name}"
        content[0] = {"type": "image_url", "image_url": {"url": url}}
        # a server on loopback is fetched from only with --allow-private-urls (test_security_ssrf.py)
        assert ask(open_server.client(), content, max_tokens=6).choices[0].message.content == answer
    finally:
        httpd.shutdown()


def test_input_audio_wav_and_mp3(server, engine, media_files):
    speech = need(media_files, "speech")
    for path, fmt in ((speech, "wav"), (need(media_files, "mp3"), "mp3")):
        content = [{"type": "text", "text": "What is said?"},
                   {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                           "format": fmt}}]
        answer = ask(server.client(), content).choices[0].message.content

        def build(conversation, path=path):
            conversation.pending.add_text("What is said?")
            conversation.attach_audio(path)
            conversation.ask("")

        assert answer == library_answer(engine, build, 6), fmt


def test_video_url_extension_part(server, engine, media_files):
    video = need(media_files, "video")
    content = [{"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
               {"type": "text", "text": "What happens?"}]
    answer = ask(server.client(), content).choices[0].message.content

    def build(conversation):
        from minicpmo_cli.api.chat import attach_video

        attach_video(conversation, video)
        conversation.ask("What happens?")

    assert answer == library_answer(engine, build, 6)


def test_multi_turn_with_system_message(server, engine):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
    answer = server.client().chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5,
                                                     temperature=0).choices[0].message.content

    def build(conversation):
        conversation.system = "You are terse."
        conversation.ask("Hi")
        conversation.answer("Hello.")
        conversation.ask("Again?")

    assert answer == library_answer(engine, build, 5)


def read_wav_bytes(data: bytes):
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    info = soundfile.info(io.BytesIO(data))
    assert (rate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    return samples


def test_spoken_answer_is_a_wav_with_its_transcript(server, engine):
    from minicpmo_cli.api.chat import Conversation, reply_with_speech
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.generation.usage import Usage

    answer = ask(server.client(), "Say hello.", max_tokens=4, seed=7, modalities=["text", "audio"],
                 audio={"voice": "alloy", "format": "wav"})
    message = answer.choices[0].message
    assert message.content is None and message.audio.id.startswith("audio_") and message.audio.expires_at > 0
    samples = read_wav_bytes(base64.b64decode(message.audio.data))
    conversation = Conversation()
    conversation.ask("Say hello.")
    counts = Usage()
    greedy = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.05, max_new_tokens=4, seed=7)
    text, wav, _ = reply_with_speech(engine, conversation, greedy, usage=counts)
    assert message.audio.transcript == text
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (counts.prompt_tokens,
                                                                            counts.completion_tokens)
    assert 1 <= counts.completion_tokens <= 4
    expected = np.rint(np.clip(wav, -1, 1) * 32767).astype(np.int16)
    assert len(samples) == len(expected) > 0 and np.array_equal(samples, expected)

    chunks = list(ask(server.client(), "Say hello.", max_tokens=4, seed=7, modalities=["text", "audio"],
                      audio={"voice": "alloy", "format": "pcm16"}, stream=True))
    audio = [c.choices[0].delta.audio.model_dump(exclude_none=True) for c in chunks
             if c.choices and c.choices[0].delta.audio is not None]
    assert "".join(a.get("transcript", "") for a in audio) == text
    pcm = b"".join(base64.b64decode(a["data"]) for a in audio if "data" in a)
    # Streamed speech is made on the streaming schedule (as `tts --stream`): the library's streamed twin.
    from minicpmo_cli.api.chat import reply_with_speaker
    from minicpmo_cli.api.speech import stream_answer_speech

    spoken, spk = reply_with_speaker(engine, conversation, greedy)
    streamed = np.concatenate(list(stream_answer_speech(engine, spk, spoken)))
    assert spoken == text and len(streamed) == len(expected)
    assert np.array_equal(np.frombuffer(pcm, "<i2"), np.rint(np.clip(streamed, -1, 1) * 32767).astype(np.int16))
    assert len({a["id"] for a in audio}) == 1 and "expires_at" in audio[-1]
