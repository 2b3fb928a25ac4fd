"""Streamed transcriptions, segment timestamps and chunking_strategy through the official `openai` client.

The server's answers are compared with `api.asr.transcribe` on the same bytes in this process (greedy)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.server.conftest import MODEL

TALK = ["Good morning and welcome to the meeting.", "The weather will be sunny tomorrow, with a light wind.",
        "Please read the first chapter before Monday.", "The library opens a new reading room next week."]
FEW_TOKENS = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """About 40 s of speech with pauses: more than one 30 s piece, so a stream has several deltas."""
    import soundfile

    from minicpmo_cli.media.audio import load_audio

    folder = tmp_path_factory.mktemp("talk")
    parts = []
    for index, text in enumerate(TALK * 3):
        path = folder / f"{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        parts += [load_audio(path), np.zeros(16000, np.float32)]
    path = folder / "talk.wav"
    soundfile.write(path, np.concatenate(parts), 16000)
    return path


def local(engine, path, **options):
    from minicpmo_cli.api.asr import AsrOptions, transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    return transcribe(engine, path.read_bytes(), AsrOptions(**options), DecodeOptions(**FEW_TOKENS),
                      path=path.name)


def create(server, path, **kwargs):
    with open(path, "rb") as handle:
        return server.client().audio.transcriptions.create(model=MODEL, file=handle, extra_body=FEW_TOKENS,
                                                           **kwargs)


def test_stream_sends_a_delta_per_piece_then_the_whole_text(server, engine, talk):
    expected = local(engine, talk)
    assert len({(s.start, s.end) for s in expected.segments}) > 1
    events = list(create(server, talk, stream=True))
    kinds = [event.type for event in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert len(kinds) >= 3  # two pieces or more, each its own delta
    assert "".join(event.delta for event in events[:-1]) == events[-1].text == expected.text


def test_verbose_json_with_segment_timestamps(server, engine, talk):
    expected = local(engine, talk)
    answer = create(server, talk, response_format="verbose_json", timestamp_granularities=["segment"])
    assert answer.text == expected.text
    assert [(s.start, s.end, s.text) for s in answer.segments] == \
        [(s.start, s.end, s.text) for s in expected.segments]


def test_chunking_strategy_maps_onto_the_vad_options(server, engine, talk):
    auto = create(server, talk, response_format="verbose_json", chunking_strategy="auto")
    assert [(s.start, s.end) for s in auto.segments] == [(s.start, s.end) for s in local(engine, talk).segments]
    strategy = {"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 50, "silence_duration_ms": 300}
    answer = create(server, talk, response_format="verbose_json", chunking_strategy=strategy)
    expected = local(engine, talk, vad_threshold=0.7, piece_pad_ms=50, min_silence_ms=300)
    assert [(s.start, s.end, s.text) for s in answer.segments] == \
        [(s.start, s.end, s.text) for s in expected.segments]
    assert [(s.start, s.end) for s in answer.segments] != [(s.start, s.end) for s in auto.segments]


@pytest.mark.parametrize("kwargs, param", [
    ({"response_format": "verbose_json", "timestamp_granularities": ["word"]}, "timestamp_granularities"),
    ({"response_format": "json", "timestamp_granularities": ["segment"]}, "timestamp_granularities"),
    ({"chunking_strategy": {"type": "semantic"}}, "chunking_strategy"),
    ({"chunking_strategy": {"type": "server_vad", "threshold": 2}}, "chunking_strategy"),
    ({"stream": True, "response_format": "srt"}, "stream"),
])
def test_bad_streaming_and_chunking_fields_are_400(server, talk, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        create(server, talk, **kwargs)
    assert caught.value.body["param"] == param


def test_a_stream_of_a_file_that_is_not_audio_ends_in_an_error_the_client_raises(server, tmp_path):
    import openai

    bad = tmp_path / "notes.wav"
    bad.write_text("these are not audio samples")
    with pytest.raises(openai.APIError, match="not an audio file"):
        list(create(server, bad, stream=True))
