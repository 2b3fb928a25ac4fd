"""LiveSession's turn logic on a scripted VAD and a stand-in model (no server, no weights): the order of
events, barge-in while an answer is slow to stop, and a turn that ends before the stopped answer is done."""

from __future__ import annotations

import asyncio
import base64
import threading

import numpy as np

from minicpmo_cli.api.live import LiveSession
from minicpmo_cli.api.live_model import AnswerStats
from minicpmo_cli.media.vad_stream import VadEvent


class ScriptedVAD:
    """Says what the test tells it to at the next feed."""

    def __init__(self, *args) -> None:
        self.position, self.next_events = 0, []

    def configure(self, *args) -> None:
        pass

    def reset(self) -> None:
        pass

    def feed(self, samples):
        self.position += len(samples)
        events, self.next_events = self.next_events, []
        return [VadEvent(kind, self.position) for kind in events]


class StandInModel:
    """Records prefills; answers with items the test releases one by one (an answer slow to stop)."""

    def __init__(self) -> None:
        self.units, self.started, self.generation_start = 0, False, None
        self.release = threading.Semaphore(0)

    def prefill_unit(self, engine, audio, frame=None, item_id=None) -> float:
        self.units += 1
        return 1.0

    def answer(self, engine, cancel, emit, *, decode, seed, speak, item_id=None) -> AnswerStats:
        stats = AnswerStats(input_tokens=5)
        for index in range(3):
            self.release.acquire()
            if cancel.is_set():
                stats.cancelled = True
                break
            emit(f"w{index} ", np.full(2400, 0.1, np.float32))
            stats.output_tokens += 1
        return stats

    def crop_answer(self, engine, kept):
        return None

    def transcribe(self, engine, audio) -> str:
        return f"heard {len(audio)} samples"


def test_barge_in_while_the_answer_is_slow_to_stop_then_the_new_turn_is_answered():
    async def scenario() -> list[dict]:
        events: list[dict] = []
        got = asyncio.Event()

        async def send(event: dict) -> None:
            events.append(event)
            got.set()

        async def until(kind: str, count: int = 1) -> None:
            while sum(e["type"] == kind for e in events) < count:
                got.clear()
                await got.wait()

        session = LiveSession(lambda fn: asyncio.to_thread(fn, None, threading.Event()), send, model="m",
                              make_vad=ScriptedVAD)
        model = session.model = StandInModel()
        chunk = {"type": "input_audio_buffer.append",
                 "audio": base64.b64encode(np.zeros(4800, "<i2").tobytes()).decode()}
        await session.start()
        await session.handle({"type": "session.update", "session": {"seed": 1}})
        session.vad.next_events = ["start"]
        await session.handle(chunk)
        for _ in range(6):  # 1.2 s of speech: one whole unit is prefilled while speaking
            await session.handle(chunk)
        session.vad.next_events = ["stop"]
        await session.handle(chunk)
        model.release.release()  # the first item of the answer
        await until("response.output_audio.delta")
        session.vad.next_events = ["start"]  # the user speaks over it: barge-in
        await session.handle(chunk)
        session.vad.next_events = ["stop"]  # ... and stops before the answer has noticed
        await session.handle(chunk)
        assert session.response is not None and session.response.stop.is_set()
        for _ in range(6):
            model.release.release()  # the first answer stops; the second one speaks all its items
        await until("response.done", 2)
        await until("conversation.item.input_audio_transcription.completed", 2)
        return events

    events = asyncio.run(scenario())
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, [e for e in events if e["type"] == "error"]
    done = [e["response"] for e in events if e["type"] == "response.done"]
    assert done[0]["status"] == "cancelled" and done[0]["status_details"]["reason"] == "turn_detected"
    assert done[0]["output"][0]["content"][0]["transcript"] == "w0 "
    assert done[1]["status"] == "completed" and done[1]["output"][0]["content"][0]["transcript"] == "w0 w1 w2 "
    assert done[0]["latency"]["prefill_units"] == 2  # 1 s while speaking + the rest at the end of the turn
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    assert kinds.count("input_audio_buffer.committed") == 2
