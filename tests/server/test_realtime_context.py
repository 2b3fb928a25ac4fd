"""A live conversation longer than the model's context, through the official openai SDK's realtime client against
a real server on a tiny checkpoint whose LLM has 320 positions (two turns of 3 s fill it): with
``truncation`` "auto" the conversation goes on, forgetting its oldest turns, and the cache never passes the
context; with "disabled" the turn that does not fit fails with ``context_length_exceeded``, and the session
goes on once the client deletes old items."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.server.conftest import API_KEY, start_server, stop_server
from tests.server.small_context import CONTEXT, small_context_checkpoint

pytest.importorskip("websockets", reason="the realtime client needs websockets (serve extra)")

ANSWER_TOKENS = 20


@pytest.fixture(scope="module")
def small_server(tiny_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-context")
    running = start_server(small_context_checkpoint(tiny_ckpt, folder), folder, "--api-key", API_KEY)
    yield running
    stop_server(running)


def spoken_item(seconds: float, seed: int) -> dict:
    """A user message of noise-like 24 kHz pcm16 (the model reads it as seconds of audio)."""
    samples = np.random.default_rng(seed).uniform(-0.2, 0.2, int(24000 * seconds))
    pcm = base64.b64encode((samples * 32767).astype("<i2").tobytes()).decode()
    return {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": pcm}]}


def next_of(conn, *kinds: str):
    """The next event of one of ``kinds`` (others are passed over; an unexpected error fails)."""
    for event in conn:
        if event.type in kinds:
            return event
        assert event.type != "error", event
    raise AssertionError(f"the connection closed before {kinds}")


def connect(server):
    return server.client().realtime.connect(model="gpt-realtime")


def configure(conn, truncation=None):
    """Text answers of at most 20 tokens, manual turns; the session.updated event."""
    created = next_of(conn, "session.created")
    assert created.session.truncation == "auto"  # the default
    session = {"type": "realtime", "output_modalities": ["text"], "max_output_tokens": ANSWER_TOKENS, "seed": 3,
               "audio": {"input": {"turn_detection": None}}}
    if truncation is not None:
        session["truncation"] = truncation
    conn.session.update(session=session)
    return next_of(conn, "session.updated")


def turn(conn, seed: int):
    conn.conversation.item.create(item=spoken_item(3.0, seed))
    conn.response.create()
    return next_of(conn, "response.done")


def test_auto_truncation_keeps_the_conversation_going_within_the_context(small_server):
    with connect(small_server) as conn:
        updated = configure(conn, {"type": "retention_ratio", "retention_ratio": 0.5,
                                   "token_limits": {"post_instructions": 1000}})
        assert updated.session.truncation.type == "retention_ratio"
        assert updated.session.truncation.retention_ratio == 0.5
        conn.session.update(session={"truncation": "auto"})
        assert next_of(conn, "session.updated").session.truncation == "auto"
        dropped, contexts = [], []
        for index in range(6):  # each turn about 120 positions: far more than 320 in all
            done = turn(conn, index)
            assert done.response.status == "completed", done
            assert done.response.usage.output_tokens > 0
            context = done.response.model_extra["context"]
            assert context["max_tokens"] == CONTEXT
            contexts.append(context["tokens"])
            dropped += context["dropped_item_ids"]
        assert max(contexts) <= CONTEXT  # the cache never holds more than the context
        assert len(dropped) >= 4 and len(set(dropped)) == len(dropped)  # whole turns: user item + answer
        # a forgotten item is no longer the server's: truncating it is an error, and the session goes on
        conn.conversation.item.truncate(item_id=dropped[1], content_index=0, audio_end_ms=0)
        assert next_of(conn, "error", "conversation.item.truncated").error.code == "item_not_found"
        assert turn(conn, 99).response.status == "completed"


def test_disabled_truncation_fails_the_turn_that_does_not_fit(small_server):
    with connect(small_server) as conn:
        updated = configure(conn, "disabled")
        assert updated.session.truncation == "disabled"
        statuses, items = [], []
        for index in range(3):
            conn.conversation.item.create(item=spoken_item(3.0, index))
            items.append(next_of(conn, "conversation.item.added").item.id)
            conn.response.create()
            while True:  # the input, then the answer, may be refused: each with an error event
                event = conn.recv()
                if event.type == "error":
                    assert event.error.code == "context_length_exceeded" and "disabled" in event.error.message
                    assert event.error.type == "invalid_request_error"
                elif event.type == "response.done":
                    break
            statuses.append(event.response.status)
            items.append(event.response.output[0].id)
            if event.response.status == "failed":
                assert event.response.status_details.error.code == "context_length_exceeded"
                break
        assert statuses == ["completed", "completed", "failed"], statuses
        for item_id in items[:2]:  # the first turn deleted by the client: room again, truncation still off
            conn.conversation.item.delete(item_id=item_id)
            assert next_of(conn, "conversation.item.deleted").item_id == item_id
        done = turn(conn, 50)
        assert done.response.status == "completed"
        assert done.response.model_extra["context"]["dropped_item_ids"] == []
        conn.conversation.item.delete(item_id=items[0])  # gone already
        assert next_of(conn, "error", "conversation.item.deleted").error.code == "item_not_found"


def test_bad_truncation_values_are_errors_naming_the_field(small_server):
    with connect(small_server) as conn:
        configure(conn)
        for bad, param in (("sometimes", "session.truncation"),
                           ({"type": "retention_ratio", "retention_ratio": 1.5}, "session.truncation.retention_ratio"),
                           ({"type": "retention_ratio", "retention_ratio": 0.5,
                             "token_limits": {"post_instructions": 0}},
                            "session.truncation.token_limits.post_instructions")):
            conn.session.update(session={"truncation": bad})
            event = next_of(conn, "error", "session.updated")
            assert event.type == "error" and event.error.param == param, event
            assert event.error.code == "invalid_value" and event.error.type == "invalid_request_error"
        conn.session.update(session={"truncation": "disabled"})
        assert next_of(conn, "error", "session.updated").session.truncation == "disabled"

