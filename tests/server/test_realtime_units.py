"""The pieces under WS /v1/realtime, without a server: the per-connection streaming VAD, the session config."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest


@pytest.fixture(scope="module")
def speech16k(tmp_path_factory) -> np.ndarray:
    from minicpmo_cli.media.audio import load_audio

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("vad") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello there, this is a test."], check=True, capture_output=True)
    speech = load_audio(str(path))
    return np.concatenate([np.zeros(16000, np.float32), speech, np.zeros(16000, np.float32)])


def events_of(vad, audio: np.ndarray, step: int = 3200) -> list:
    found = []
    for start in range(0, len(audio), step):
        found += vad.feed(audio[start:start + step])
    return found


def test_streaming_vad_finds_the_turn_and_keeps_its_own_state(speech16k):
    from minicpmo_cli.media.vad_stream import StreamingVAD

    alone = events_of(StreamingVAD(prefix_padding_ms=0, silence_duration_ms=400), speech16k)
    assert [e.kind for e in alone] == ["start", "stop"]
    assert 12000 <= alone[0].sample <= 20000 < alone[1].sample <= len(speech16k) - 16000 + 4000
    first, second = StreamingVAD(prefix_padding_ms=0, silence_duration_ms=400), StreamingVAD(
        prefix_padding_ms=0, silence_duration_ms=400)
    quiet = np.zeros_like(speech16k)
    found_first, found_second = [], []
    for start in range(0, len(speech16k), 3200):  # interleaved: speech into one, silence into the other
        found_first += first.feed(speech16k[start:start + 3200])
        found_second += second.feed(quiet[start:start + 3200])
    assert found_first == alone and found_second == []


def test_session_update_reads_ga_and_beta_names_and_names_the_bad_field():
    from minicpmo_cli.api.live_session_config import LiveError, SessionConfig

    config = SessionConfig(model="m").updated({
        "type": "realtime", "instructions": "Be brief.",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                               "silence_duration_ms": 700, "interrupt_response": False}},
                  "output": {"voice": "alloy"}}})
    assert (config.instructions, config.turn_detection.threshold, config.turn_detection.silence_duration_ms,
            config.turn_detection.interrupt_response) == ("Be brief.", 0.6, 700, False)
    assert config.updated({"turn_detection": None, "input_audio_format": "pcm16"}).turn_detection is None
    echoed = config.to_json("sess_1")
    assert echoed["audio"]["input"]["turn_detection"]["prefix_padding_ms"] == 200
    for bad, param in (({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
                        "session.audio.output.format"),
                       ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
                        "session.audio.input.turn_detection.type"),
                       ({"max_output_tokens": 0}, "session.max_output_tokens"),
                       ({"output_modalities": ["video"]}, "session.output_modalities")):
        with pytest.raises(LiveError) as error:
            config.updated(bad)
        assert error.value.param == param
