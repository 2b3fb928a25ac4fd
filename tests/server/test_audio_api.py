"""/v1/audio/transcriptions, /translations, /speech and /voices through the official `openai` client.

Transcripts are compared with `api.asr.transcribe` on the same bytes in this process (greedy decoding,
OpenAI's temperature 0); speech is checked as audio: format, rate, length, and equality with the library
where it is seeded.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.server.conftest import API_KEY, MODEL, need

CAP = 0.2  # s of speech per sentence group: random weights rarely stop by themselves
SHORT = {"max_audio_seconds": CAP, "seed": 3}


@pytest.fixture(scope="module")
def local_record(engine, media_files):
    from minicpmo_cli.api.asr import transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    speech = need(media_files, "speech")
    return transcribe(engine, speech.read_bytes(), decode=DecodeOptions(max_new_tokens=6), path="speech.wav")


def transcribe_with(server, path, fmt, **kwargs):
    with open(path, "rb") as handle:
        return server.client().audio.transcriptions.create(model=MODEL, file=handle, response_format=fmt,
                                                           extra_body={"max_new_tokens": 6}, **kwargs)


def test_transcription_formats_match_the_library(server, media_files, local_record):
    from minicpmo_cli.outputs import SrtWriter, VttWriter

    speech = need(media_files, "speech")
    assert transcribe_with(server, speech, "json").text == local_record.text
    assert transcribe_with(server, speech, "text").strip() == local_record.text
    assert transcribe_with(server, speech, "srt") == SrtWriter().format(local_record)
    assert transcribe_with(server, speech, "vtt") == VttWriter().format(local_record)
    verbose = transcribe_with(server, speech, "verbose_json")
    assert (verbose.text, verbose.language, verbose.duration) == (local_record.text, local_record.language,
                                                                  local_record.duration)
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(s.start, s.end, s.text)
                                                                    for s in local_record.segments]


def test_transcription_of_mp3_with_language_and_prompt(server, media_files, engine):
    from minicpmo_cli.api.asr import AsrOptions, transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    mp3 = need(media_files, "mp3")
    answer = transcribe_with(server, mp3, "json", language="zh", prompt="Write down what is said.")
    local = transcribe(engine, mp3.read_bytes(), AsrOptions(language="zh", prompt="Write down what is said."),
                       DecodeOptions(max_new_tokens=6))
    assert answer.text == local.text


def test_translation_to_english(server, media_files, engine):
    from minicpmo_cli.api.asr import AsrOptions, transcribe
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.server.transcriptions import TRANSLATE_EN

    speech = need(media_files, "speech")
    with open(speech, "rb") as handle:
        answer = server.client().audio.translations.create(model=MODEL, file=handle, response_format="verbose_json",
                                                           extra_body={"max_new_tokens": 6})
    local = transcribe(engine, speech.read_bytes(), AsrOptions(language="en", prompt=TRANSLATE_EN),
                       DecodeOptions(max_new_tokens=6))
    assert answer.text == local.text and answer.language == "english"


def decode_audio(data: bytes):
    """(samples, rate, channels) of any encoded audio, through PyAV."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        return np.concatenate(frames, axis=-1), stream.rate, stream.channels


def speech(server, **kwargs):
    kwargs = {"model": MODEL, "input": "Hello there.", "voice": "alloy", **kwargs}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ("max_audio_seconds", "seed", "reference_audio")}
    return server.client().audio.speech.create(extra_body=extra, **kwargs)


def test_speech_wav_equals_the_library(server, engine):
    from minicpmo_cli.api.speech import Voice

    assert speech(server, response_format="wav", **SHORT).content == library_wav(engine, Voice())


def test_speech_formats_speed_and_pcm(server):
    wav = speech(server, response_format="wav", **SHORT).content
    reference, rate, channels = decode_audio(wav)
    assert (rate, channels) == (24000, 1) and reference.shape[-1] > 0
    pcm = speech(server, response_format="pcm", **SHORT).content
    assert pcm == wav[44:]  # the same samples, without the header
    for fmt in ("flac", "mp3", "opus", "aac"):
        samples, rate, channels = decode_audio(speech(server, response_format=fmt, **SHORT).content)
        assert channels == 1 and samples.shape[-1] / rate == pytest.approx(reference.shape[-1] / 24000, abs=0.1), fmt
    fast, _, _ = decode_audio(speech(server, response_format="wav", speed=2.0, **SHORT).content)
    assert fast.shape[-1] == pytest.approx(reference.shape[-1] / 2, rel=0.05)


def _streamed_speech(server, **fields) -> tuple[httpx.Headers, list[bytes]]:
    body = {"model": MODEL, "input": "Hello there.", "voice": "alloy", **SHORT, **fields}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        return response.headers, list(response.iter_bytes())


def test_speech_streamed_as_made_equals_the_library_stream(server, engine):
    """SSE and an explicit stream_format "audio" send the speech as it is synthesised, on the streaming
    schedule of `tts --stream`: the same samples as api.speech.speak_stream with the same seed."""
    from minicpmo_cli.api.speech import Voice, frames_for_seconds, speak_stream
    from minicpmo_cli.server.encode import pcm16_bytes

    local = speak_stream(engine, "Hello there.", Voice(), max_frames=frames_for_seconds(CAP), seed=3)
    expected = pcm16_bytes(np.concatenate(list(local)))
    headers, chunks = _streamed_speech(server, response_format="pcm", stream_format="sse")
    assert headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in b"".join(chunks).decode().splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] > 0
    assert len(events) > 2  # more than one piece: it was streamed, not sent whole
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == expected
    _, raw = _streamed_speech(server, response_format="pcm", stream_format="audio")
    assert b"".join(raw) == expected
    headers, wav = _streamed_speech(server, response_format="wav", stream_format="audio")
    wav = b"".join(wav)
    assert headers["content-type"] == "audio/wav" and wav[44:] == expected
    samples, rate, _ = decode_audio(wav)
    assert rate == 24000 and samples.shape[-1] == len(expected) // 2
    # Formats that cannot be cut while being made arrive whole, in the SSE events all the same.
    _, mp3 = _streamed_speech(server, response_format="mp3", stream_format="sse")
    events = [json.loads(line[6:]) for line in b"".join(mp3).decode().splitlines() if line.startswith("data: ")]
    assert decode_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]))[1] == 24000


def test_speech_input_over_4096_characters_is_400(server):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        speech(server, input="word " * 1000)  # 5000 characters
    assert caught.value.status_code == 400 and "4096" in caught.value.message


def library_wav(engine, voice):
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.api.speech import frames_for_seconds, speak
    from minicpmo_cli.outputs import wav_bytes

    local = speak(engine, "Hello there.", voice, decode=DecodeOptions(seed=3), max_frames=frames_for_seconds(CAP))
    return wav_bytes(local.wav, local.sample_rate)


def test_saved_voice_reference_and_instructions(server, engine, media_files):
    from minicpmo_cli.api.speech import Voice

    ref = need(media_files, "ref")
    env = {"MINICPMO_HOME": str(server.home), "PATH": ""}
    subprocess.run([sys.executable, "-m", "minicpmo_cli", "voices", "add", "alice", str(ref)], check=True,
                   env={**__import__("os").environ, **env}, capture_output=True)
    default = speech(server, response_format="wav", **SHORT).content
    alice = speech(server, voice="alice", response_format="wav", **SHORT).content
    saved = (server.home / "voices" / "alice.wav").read_bytes()  # the profile as stored: 16 kHz PCM16
    uploaded = speech(server, response_format="wav", reference_audio=base64.b64encode(saved).decode(),
                      **SHORT).content
    assert alice == uploaded and alice != default
    # (On the tiny checkpoint a described voice sounds like the default one: compare with the library.)
    described = speech(server, response_format="wav", instructions="A calm, deep male voice.", **SHORT).content
    assert described == library_wav(engine, Voice(instruction="A calm, deep male voice."))
    voices = httpx.get(f"{server.url}/v1/audio/voices", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    names = {(v["id"], v["type"]) for v in voices["data"]}
    assert ("alice", "profile") in names and ("alloy", "builtin") in names
