"""The staged asr pipeline (decode threads -> VAD over many files -> batched language probes -> batched pieces)
gives byte for byte the records of the one-by-one path: one file at a time through the VAD, one piece per
model call, one language probe per file."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

SENTENCES = ["Good morning and welcome to the meeting.", "The weather will be sunny tomorrow.",
             "Please read the first chapter before Monday.", "One two three.",
             "The library opens a new reading room next week, with long tables and quiet corners."]


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from minicpmo_cli.api.engine import LoadOptions, load

    return load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=True, tts=False)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[np.ndarray]:
    from minicpmo_cli.media.audio import load_audio

    folder = tmp_path_factory.mktemp("speech")
    clips = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        clips.append(load_audio(path))
    return clips


def test_staged_pipeline_equals_one_by_one(engine, speech, monkeypatch):
    from minicpmo_cli.api import asr, asr_model_calls
    from minicpmo_cli.api.asr_pipeline import Stages
    from minicpmo_cli.api.engine import DecodeOptions

    pause = np.zeros(16000, np.float32)
    long_talk = np.concatenate([part for clip in speech * 3 for part in (clip, pause)])  # > 30 s: several pieces
    noise = (0.01 * np.random.default_rng(0).standard_normal(16000 * 4)).astype(np.float32)
    sources = [*speech, long_talk, noise, b"not audio at all", speech[0][:4000]]
    inputs = [asr.AudioInput(f"in{i}", source) for i, source in enumerate(sources)]
    decode = DecodeOptions(max_new_tokens=4, sampling=False, num_beams=1, repetition_penalty=1.0)
    calls: list[int] = []
    real = asr_model_calls.start_batch

    def counted(model, clips, instructions):
        calls.append(len(clips))
        return real(model, clips, instructions)

    monkeypatch.setattr(asr_model_calls, "start_batch", counted)
    one_by_one = list(asr.transcribe_many(engine, inputs, asr.AsrOptions(batch_size=1), decode,
                                          stages=Stages(decode_threads=1, vad_files=1)))
    alone_calls, calls[:] = list(calls), []
    staged = list(asr.transcribe_many(engine, inputs, asr.AsrOptions(batch_size=4), decode,
                                      stages=Stages(vad_files=len(inputs))))
    assert [r.to_dict() for r in staged] == [r.to_dict() for r in one_by_one]
    assert [r.path for r in staged] == [f"in{i}" for i in range(len(inputs))]
    assert len(one_by_one[5].segments) > 3 and one_by_one[6].text == "" and one_by_one[7].error
    assert set(alone_calls) == {1} and max(calls) > 1 and len(calls) < len(alone_calls)  # probes batched too
