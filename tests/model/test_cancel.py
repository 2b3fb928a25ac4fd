"""A decode whose caller gives up (a server request whose client left) stops: the cancel event reaches the
engine through api.Engine.generate and the written half of a spoken answer (a cancel that comes before the
prompt is prefilled stops the request at once)."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=True, tts=True)


def _long_answer_options():
    from minicpmo_cli.api.engine import DecodeOptions

    # min_new_tokens: the random tiny model cannot end the answer early, so only a cancel can make it short
    return DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=96, min_new_tokens=96)


def _question():
    from minicpmo_cli.api.chat import Conversation

    conversation = Conversation()
    conversation.ask("Talk for a long time.")
    return conversation


def test_the_written_half_of_a_spoken_answer_stops_when_cancelled(engine):
    from minicpmo_cli.api.chat import reply_with_speaker
    from minicpmo_cli.generation.text import Usage

    whole, cut = Usage(), Usage()
    reply_with_speaker(engine, _question(), _long_answer_options(), usage=whole)
    assert whole.completion_tokens == 96
    cancel = threading.Event()
    cancel.set()
    text, speaker = reply_with_speaker(engine, _question(), _long_answer_options(), usage=cut, cancel=cancel)
    assert cut.completion_tokens < 96 and len(text) < 96
    assert speaker is None  # cancelled before its prompt was prefilled: no speaker state to read


def test_a_cancelled_transcription_sends_nothing_more_to_the_model(engine):
    import numpy as np

    from minicpmo_cli.api.asr import AsrOptions, TranscriptionCancelled, transcribe
    from minicpmo_cli.api.engine import DecodeOptions

    audio = (0.1 * np.random.default_rng(3).standard_normal(16000 * 3)).astype(np.float32)
    options, decode = AsrOptions(vad=False, language="en"), DecodeOptions(max_new_tokens=4)
    assert transcribe(engine, audio, options, decode).error is None
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TranscriptionCancelled):
        transcribe(engine, audio, options, decode, cancel=cancel)
