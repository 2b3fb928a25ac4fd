"""Concurrent /v1/audio/speech requests (whole and streamed) through the official `openai` client: their
frames are decoded on the server's one TTS engine (generation/tts_engine.py), and every answer is the audio
the library makes for that text and seed alone (tests/model/test_tts_engine.py and test_tts_stream_engine.py
prove the rows really share steps)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.server.conftest import MODEL

TEXTS = ["Hello there.", "A second voice, a little longer than the first.", "Third one.",
         "The fourth request reads a sentence of some more words than the others do."]
CAP = 0.3  # s of speech per sentence group: random weights rarely stop by themselves


def library_wav(engine, text: str, seed: int) -> bytes:
    from minicpmo_cli.api.engine import DecodeOptions
    from minicpmo_cli.api.speech import frames_for_seconds, speak
    from minicpmo_cli.outputs import wav_bytes

    local = speak(engine, text, decode=DecodeOptions(seed=seed), max_frames=frames_for_seconds(CAP))
    return wav_bytes(local.wav, local.sample_rate)


def test_concurrent_speech_requests_each_equal_the_library_alone(server, engine):
    def ask(index: int) -> bytes:
        response = server.client().audio.speech.create(
            model=MODEL, input=TEXTS[index], voice="alloy", response_format="wav",
            extra_body={"max_audio_seconds": CAP, "seed": 20 + index})
        return response.content

    with ThreadPoolExecutor(len(TEXTS)) as pool:
        answers = list(pool.map(ask, range(len(TEXTS))))
    for index, answer in enumerate(answers):
        assert answer[:4] == b"RIFF" and answer[8:12] == b"WAVE"
        assert answer == library_wav(engine, TEXTS[index], 20 + index), index


def test_concurrent_streamed_speech_each_equals_the_library_stream_alone(server, engine):
    """Streamed speech (stream_format "audio", raw pcm) for several clients at once: their frames share the
    server's TTS engine as streamed rows (generation/tts_stream.py), and each client gets, byte for byte, the
    samples api.speech.speak_stream makes for its text and seed alone."""
    from minicpmo_cli.api.speech import Voice, frames_for_seconds, speak_stream
    from minicpmo_cli.server.encode import pcm16_bytes

    def ask(index: int) -> bytes:
        with server.client().audio.speech.with_streaming_response.create(
                model=MODEL, input=TEXTS[index], voice="alloy", response_format="pcm", stream_format="audio",
                extra_body={"max_audio_seconds": CAP, "seed": 40 + index}) as response:
            return b"".join(response.iter_bytes())

    with ThreadPoolExecutor(len(TEXTS)) as pool:
        answers = list(pool.map(ask, range(len(TEXTS))))
    for index, answer in enumerate(answers):
        local = speak_stream(engine, TEXTS[index], Voice(), max_frames=frames_for_seconds(CAP), seed=40 + index)
        expected = pcm16_bytes(np.concatenate(list(local)))
        assert len(answer) > 0 and answer == expected, index
