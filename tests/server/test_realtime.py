"""WS /v1/realtime through the official openai SDK's realtime client, against a real server (tiny checkpoint)."""

from __future__ import annotations

import base64
import subprocess

import numpy as np
import pytest

from tests.server.conftest import API_KEY

pytest.importorskip("websockets", reason="the realtime client needs websockets (serve extra)")

CHUNK = 4800  # 0.2 s of 24 kHz audio per append


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    """A spoken question (espeak-ng) at 24 kHz float32, with 0.5 s of silence before and 1 s after."""
    import shutil

    from minicpmo_cli.media.audio import load_audio, resample

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("realtime") / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is the weather like in Paris today?"], check=True,
                   capture_output=True)
    speech = resample(load_audio(str(path)), 16000, 24000)
    return np.concatenate([np.zeros(12000, np.float32), speech, np.zeros(24000, np.float32)])


def pcm_chunks(audio: np.ndarray, size: int = CHUNK) -> list[str]:
    data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    return [base64.b64encode(data[i:i + 2 * size]).decode() for i in range(0, len(data), 2 * size)]


def connect(server, **kwargs):
    return server.client(**kwargs).realtime.connect(model="gpt-realtime")


def events_until(conn, kind: str, limit: int = 5000) -> list:
    seen = []
    for event in conn:
        seen.append(event)
        if event.type == kind:
            return seen
        assert len(seen) < limit, [e.type for e in seen[-20:]]
    raise AssertionError(f"the connection closed before {kind}: {[e.type for e in seen[-20:]]}")


def answer_of(events) -> tuple[bytes, str, object]:
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    done = [e for e in events if e.type == "response.done"][-1]
    return audio, transcript, done


def spoken_turn(conn, audio: np.ndarray) -> list:
    for chunk in pcm_chunks(audio):
        conn.input_audio_buffer.append(audio=chunk)
    return events_until(conn, "response.done")


def test_spoken_question_vad_turn(server, question):
    with connect(server) as conn:
        created = events_until(conn, "session.created")[-1]
        assert created.session.audio.output.format.rate == 24000
        conn.session.update(session={"type": "realtime", "seed": 7, "max_output_tokens": 60,
                                     "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                            "silence_duration_ms": 400}}}})
        updated = events_until(conn, "session.updated")[-1]
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 400
        events = spoken_turn(conn, question)
        kinds = [e.type for e in events]
        for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.added", "response.created",
                     "response.output_audio.delta", "response.output_audio_transcript.delta",
                     "response.output_audio_transcript.done", "response.output_audio.done"):
            assert kind in kinds, kind
        assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
        started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
        stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
        assert 0 < started.audio_start_ms < stopped.audio_end_ms
        audio, transcript, done = answer_of(events)
        assert len(audio) > 0 and len(audio) % 2 == 0
        assert done.response.status == "completed"
        done_transcript = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
        assert done_transcript == transcript
        assert done.response.usage.output_tokens > 0 and done.response.usage.input_tokens > 0
        latency = done.response.model_extra["latency"]
        assert latency["vad_silence_ms"] == 400 and latency["speech_end_to_first_audio_ms"] >= 0
        assert latency["prefill_units"] >= 2 and latency["prefill_ms_per_unit_median"] > 0
        # the user's turn gets its transcript after the answer
        rest = events_until(conn, "conversation.item.done")
        assert rest[-1].item.role == "user" and rest[-1].item.content[0].transcript is not None


def test_manual_turns_and_second_turn(server, question):
    with connect(server) as conn:
        conn.session.update(session={"type": "realtime", "seed": 1, "max_output_tokens": 30,
                                     "audio": {"input": {"turn_detection": None}}})
        assert events_until(conn, "session.updated")[-1].session.audio.input.turn_detection is None
        for chunk in pcm_chunks(question):
            conn.input_audio_buffer.append(audio=chunk)
        conn.input_audio_buffer.commit()
        conn.response.create()
        events = events_until(conn, "response.done")
        kinds = [e.type for e in events]
        assert "input_audio_buffer.speech_started" not in kinds
        assert "input_audio_buffer.committed" in kinds
        audio, _, done = answer_of(events)
        assert audio and done.response.status == "completed"
        assert done.response.model_extra["latency"]["prefill_units"] >= 3
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "And tomorrow?"}]})
        conn.response.create()
        second = events_until(conn, "response.done")
        assert answer_of(second)[2].response.status == "completed"
        conn.input_audio_buffer.commit()  # nothing appended since: an error, the session goes on
        error = events_until(conn, "error")[-1]
        assert error.error.code == "input_audio_buffer_commit_empty"
