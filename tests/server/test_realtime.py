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
    """Events up to the first of ``kind``; a response that ends (or an error) first fails the test."""
    seen = []
    for event in conn:
        seen.append(event)
        if event.type == kind:
            return seen
        assert event.type not in ("error", "response.done") or kind == "response.done", event
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


def test_barge_in_cancels_the_answer_and_the_conversation_goes_on(server, question):
    with connect(server) as conn:
        conn.session.update(session={"type": "realtime", "seed": 2, "max_output_tokens": 2000,
                                     "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                            "silence_duration_ms": 400}}}})
        for chunk in pcm_chunks(question):
            conn.input_audio_buffer.append(audio=chunk)
        first = events_until(conn, "response.output_audio.delta")  # a long answer is being spoken
        response_id = next(e for e in first if e.type == "response.created").response.id
        conn.session.update(session={"max_output_tokens": 20})  # the next answer is short
        for chunk in pcm_chunks(question):  # the user speaks over it
            conn.input_audio_buffer.append(audio=chunk)
        events = first + events_until(conn, "response.done")
        interrupted = answer_of(events)[2]
        assert interrupted.response.id == response_id
        assert interrupted.response.status == "cancelled"
        assert interrupted.response.status_details.reason == "turn_detected"
        assert "input_audio_buffer.speech_started" in [e.type for e in events]
        item = interrupted.response.output[0]
        sent = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert item.status == "incomplete" and item.content[0].transcript == sent
        audio_ms = len(answer_of(events)[0]) // 2 * 1000 // 24000
        conn.conversation.item.truncate(item_id=item.id, content_index=0, audio_end_ms=audio_ms // 2)
        truncated = events_until(conn, "conversation.item.truncated")[-1]
        assert truncated.item_id == item.id and truncated.audio_end_ms == audio_ms // 2
        following = events_until(conn, "response.done")  # the new turn is answered
        assert answer_of(following)[2].response.status == "completed"
        assert answer_of(following)[0]


def _manual_answer(server, question, seed: int) -> tuple[bytes, str]:
    with connect(server) as conn:
        conn.session.update(session={"type": "realtime", "seed": seed, "max_output_tokens": 40,
                                     "audio": {"input": {"turn_detection": None}}})
        for chunk in pcm_chunks(question):
            conn.input_audio_buffer.append(audio=chunk)
        conn.input_audio_buffer.commit()
        conn.response.create()
        audio, transcript, done = answer_of(events_until(conn, "response.done"))
        assert done.response.status == "completed"
        return audio, transcript


def test_two_sessions_at_once_answer_as_alone(server, question):
    from concurrent.futures import ThreadPoolExecutor

    alone = [_manual_answer(server, question, seed) for seed in (11, 12)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda seed: _manual_answer(server, question, seed), (11, 12)))
    assert together == alone
    assert alone[0] != alone[1]  # the seeds matter: the comparison can fail


def test_malformed_events_get_errors_and_the_session_goes_on(server, question):
    with connect(server) as conn:
        events_until(conn, "session.created")
        bad = [
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_event"),
            ('{"type": "no.such.event"}', "invalid_event_type"),
            ('{"type": "input_audio_buffer.append", "audio": "***"}', "invalid_value"),
            ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}',
             "unsupported_audio_format"),
            ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": '
             '{"type": "server_vad", "threshold": 7}}}}}', "invalid_value"),
            ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
             '"content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}}', "invalid_value"),
            ('{"type": "response.cancel"}', "response_cancel_not_active"),
            ('{"type": "input_audio_buffer.append", "audio": "' + "A" * (15 * 1024 * 1024 + 4096) + '"}',
             "event_too_large"),
        ]
        for text, code in bad:
            conn.send_raw(text)
            error = events_until(conn, "error")[-1]
            assert error.error.code == code, (text[:80], error)
            assert error.error.type == "invalid_request_error" and error.error.message
        conn.session.update(session={"type": "realtime", "seed": 3, "max_output_tokens": 20,
                                     "audio": {"input": {"turn_detection": None}}})
        events_until(conn, "session.updated")
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hello?"}]})
        conn.response.create()
        assert answer_of(events_until(conn, "response.done"))[2].response.status == "completed"


def test_auth_header_subprotocol_and_refusal(server):
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    url = server.url.replace("http", "ws") + "/v1/realtime?model=tiny"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, additional_headers={"Authorization": "Bearer wrong"})
    assert refused.value.response.status_code == 401
    assert b"invalid_api_key" in refused.value.response.body
    with ws_client.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"]) as conn:
        assert conn.subprotocol == "realtime"
        import json

        assert json.loads(conn.recv(timeout=60))["type"] == "session.created"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_long_session_memory_stays_flat(server, question):
    """A shorter proxy of a 5-minute session (2 busy cores): 90 s of audio, mostly silence with a spoken
    turn every 15 s, answered in text; the server's memory after the first turns stays where it was."""
    import os

    if not os.path.exists(f"/proc/{server.process.pid}/status"):
        pytest.skip("needs /proc to read the server's memory")
    silence = np.zeros(24000 * 15 - len(question), np.float32)
    with connect(server) as conn:
        conn.session.update(session={"type": "realtime", "seed": 4, "max_output_tokens": 3,
                                     "output_modalities": ["text"],
                                     "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                            "silence_duration_ms": 300}}}})
        events_until(conn, "session.updated")
        sizes = []
        for turn in range(6):
            for chunk in pcm_chunks(np.concatenate([question, silence])):
                conn.input_audio_buffer.append(audio=chunk)
            done = answer_of(events_until(conn, "response.done"))[2]
            assert done.response.status == "completed"
            events_until(conn, "conversation.item.done")  # the user's transcript
            sizes.append(_rss_kb(server.process.pid))
        growth_mb = (sizes[-1] - sizes[1]) / 1024
        assert growth_mb < 40, sizes


def _items_answer(server, pcm: str, picture: str | None):
    with connect(server) as conn:
        conn.session.update(session={"type": "realtime", "seed": 9, "max_output_tokens": 10,
                                     "audio": {"input": {"turn_detection": None}}})
        events_until(conn, "session.updated")
        if picture is not None:
            conn.conversation.item.create(item={"type": "message", "role": "user",
                                                "content": [{"type": "input_image", "image_url": picture}]})
            frame = events_until(conn, "conversation.item.done")[-1]
            assert frame.item.content[0].type == "input_image"
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_audio", "audio": pcm}]})
        events_until(conn, "conversation.item.done")
        conn.response.create()
        done = answer_of(events_until(conn, "response.done"))[2]
        assert done.response.status == "completed"
        return done.response.usage.input_tokens


def test_audio_and_image_items(server, question, media_files):
    picture = "data:image/png;base64," + base64.b64encode(media_files["picture"].read_bytes()).decode()
    pcm = base64.b64encode((np.clip(question, -1, 1) * 32767).astype("<i2").tobytes()).decode()
    with_frame, without = _items_answer(server, pcm, picture), _items_answer(server, pcm, None)
    assert with_frame > without > 0  # the frame went in with the first audio unit
