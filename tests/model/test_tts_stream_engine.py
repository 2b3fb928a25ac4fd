"""Streamed speech on the TTS engine (generation/tts_stream.py) against the one-at-a-time streaming loop
(generation/speech.py ``stream_speech``): several streams decoded in shared steps, each chunk (text and
samples) equal to the loop's for the same seed and text; a stream joining others mid-decode; a stream
continued in a second segment; whole-text rows next to streamed ones; abort and cancel free the slot; text
handed over while the row runs (it waits in its slot, skipped by the steps)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from minicpmo_cli.generation import speech
from minicpmo_cli.generation.speech import StreamDecoder, as_text_rounds, decode_codes, make_sampler, stream_speech
from minicpmo_cli.generation.tts_engine import TTSEngine, TTSPiece, TTSRequest, TTSStreamRequest
from minicpmo_cli.model.tts import AUDIO_EOS_ID
from minicpmo_cli.model.tts_sampling import FrameBudget
from tests.model.test_tts_engine import alone, speaker


@pytest.fixture(scope="module")
def golden(golden_ckpt, golden_tts):
    from minicpmo_cli.model.vocoder import load_vocos

    tts, tokenizer = golden_tts
    return tts, load_vocos(golden_ckpt / "assets" / "Vocos.pt", tts.config), tokenizer


class EndsAt:
    """A seeded sampler that draws the audio EOS at the given frame numbers of the stream (a random TTS rarely
    stops by itself), with snapshot / restore so the engine reads the end of speech every few frames."""

    def __init__(self, seed, ends=()):
        self.sampler, self.ends, self.frames = make_sampler(seed), set(ends), 0

    @property
    def private(self):
        return self.sampler.private

    def snapshot(self):
        return self.sampler.snapshot(), self.frames

    def restore(self, state):
        inner, self.frames = state
        self.sampler.restore(inner)

    def sample(self, probs):
        drawn = self.sampler.sample(probs)
        self.frames += 1
        if self.frames in self.ends:
            drawn[0, 0] = AUDIO_EOS_ID
        return drawn


LONG = "hello world, the voice of the helpful assistant. " * 9  # 135 tokens: a second segment
# (seed, text, frames where the audio ends, frame cap): streams that end by the cap, by an end of speech in a
# call, and one whose first segment ends after its text (so a second segment is primed from it)
STREAMS = [(5, "hello world, the voice.", (), 60), (8, "a short one.", (40,), 90), (11, LONG, (316,), 110)]


def loop_chunks(tts, vocos, tokenizer, seed, text, ends, cap, monkeypatch):
    monkeypatch.setattr(speech, "make_sampler", lambda seed=None: EndsAt(seed, ends))
    try:
        return [(c.text, c.wav) for c in stream_speech(tts, vocos, tokenizer, speaker(tts, seed), as_text_rounds(text),
                                                       seed=seed, max_new_tokens=cap)]
    finally:
        monkeypatch.undo()


def stream_request(tts, seed, text, ends, cap, **extra):
    return TTSStreamRequest(speaker(tts, seed), as_text_rounds(text), EndsAt(seed, ends), max_new_tokens=cap, **extra)


def engine_chunks(tts, vocos, handle):
    decoder = StreamDecoder(lambda codes: decode_codes(tts, vocos, codes))
    return [(c.text, c.wav) for event in handle.pieces() for c in decoder.feed(event)]


def assert_same(got, expected, case):
    assert [text for text, _ in got] == [text for text, _ in expected], case
    assert len(got) == len(expected) and all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, expected)), case


@pytest.fixture(scope="module")
def expected(golden):
    tts, vocos, tokenizer = golden
    with pytest.MonkeyPatch.context() as monkeypatch:
        return [loop_chunks(tts, vocos, tokenizer, *case, monkeypatch) for case in STREAMS]


def test_streams_batched_give_the_loop_chunks(golden, expected):
    tts, vocos, tokenizer = golden
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=4)
    whole = engine.submit(TTSRequest(speaker(tts, 2), [TTSPiece("hello world.", FrameBudget(make_sampler(2), 70))]))
    handles = [engine.submit(stream_request(tts, *case)) for case in STREAMS]
    for handle, case, chunks in zip(handles, STREAMS, expected):
        assert_same(engine_chunks(tts, vocos, handle), chunks, case)
        assert handle.reason == "stop"
    assert len(expected[2]) > 1 and "".join(text for text, _ in expected[2]) == LONG  # both segments spoken
    assert torch.equal(whole.result()[0], alone(tts, tokenizer, 2, "hello world.", 70))
    assert engine.stats.peak_rows == 4 and engine.stats.frames_together > 0  # they really shared steps
    assert engine.pool.free_slots == engine.pool.slots


def test_a_stream_joining_mid_decode(golden, expected):
    """Two slots: the second stream arrives while the first is inside a call; the third waits for a slot."""
    tts, vocos, tokenizer = golden
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=2)
    first = engine.submit(stream_request(tts, *STREAMS[2]))
    for _ in range(37):
        engine.step()
    later = [engine.submit(stream_request(tts, *case)) for case in STREAMS[:2]]
    assert_same(engine_chunks(tts, vocos, first), expected[2], STREAMS[2])
    for handle, case, chunks in zip(later, STREAMS[:2], expected[:2]):
        assert_same(engine_chunks(tts, vocos, handle), chunks, case)
    assert engine.pool.slots == 2 and engine.stats.peak_rows == 2


def test_threaded_streams_from_concurrent_callers(golden, expected):
    tts, vocos, tokenizer = golden
    engine = TTSEngine(tts, tokenizer, max_batch=4)
    results = {}

    def caller(index):
        results[index] = engine_chunks(tts, vocos, engine.submit(stream_request(tts, *STREAMS[index])))

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(len(STREAMS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, case in enumerate(STREAMS):
        assert_same(results[index], expected[index], case)
    engine.close()


def test_abort_and_cancel_of_a_stream_free_the_slot(golden, expected):
    tts, vocos, tokenizer = golden
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=1)
    cancel = threading.Event()
    aborted = engine.submit(stream_request(tts, 1, LONG, (), 400))
    cancelled = engine.submit(stream_request(tts, 2, LONG, (), 400, cancel=cancel))
    waiting = engine.submit(stream_request(tts, *STREAMS[0]))
    for _ in range(30):
        engine.step()
    assert aborted.reason is None and engine.pool.free_slots == 0
    aborted.abort()
    engine.step()
    assert aborted.reason == "abort" and next(iter(engine.running.values())).handle is cancelled
    cancel.set()
    assert_same(engine_chunks(tts, vocos, waiting), expected[0], STREAMS[0])
    assert cancelled.reason == "abort" and engine.pool.free_slots == engine.pool.slots


def test_an_empty_stream_finishes_without_a_slot_held(golden):
    tts, vocos, tokenizer = golden
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=1)
    handle = engine.submit(stream_request(tts, 0, "", (), 60))
    assert engine_chunks(tts, vocos, handle) == [] and handle.reason == "stop"
    assert engine.pool.free_slots == engine.pool.slots


def waits(engine, handle) -> bool:
    """Whether ``handle``'s row is in its slot waiting for text."""
    return any(row.handle is handle and row.waiting for row in engine.running.values())


def test_a_stream_fed_text_while_it_runs_waits_in_its_slot(golden, expected):
    """Text handed over piece by piece (TextFeed): the row waits in its slot while it has none, skipped by
    the steps (the other row goes on alone), and its chunks are the loop's for the same pieces."""
    from minicpmo_cli.generation.tts_engine import TextFeed

    tts, vocos, tokenizer = golden
    seed, text, ends, cap = STREAMS[0]
    rounds = as_text_rounds(text)
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=4)
    feed = TextFeed(rounds[:1])
    fed = engine.submit(TTSStreamRequest(speaker(tts, seed), feed, EndsAt(seed, ends), max_new_tokens=cap))
    other = engine.submit(stream_request(tts, *STREAMS[2]))
    skipped = 0
    for piece in rounds[1:]:
        for _ in range(100):  # until it has used its text (a bounded wait for that state, not for time)
            if waits(engine, fed):
                break
            engine.step()
        assert waits(engine, fed)
        frames = engine.stats.frames
        engine.step()
        skipped += engine.stats.frames - frames == 1  # only the other row drew
        feed.put(piece)
    feed.close()
    assert skipped > 0
    assert_same(engine_chunks(tts, vocos, fed), expected[0], STREAMS[0])
    assert_same(engine_chunks(tts, vocos, other), expected[2], STREAMS[2])
    assert engine.pool.free_slots == engine.pool.slots


def test_a_threaded_engine_sleeps_while_its_rows_wait_for_text(golden, expected):
    """A feeder thread hands the pieces over as it likes: the same chunks, whatever the timing."""
    from minicpmo_cli.generation.tts_engine import TextFeed

    tts, vocos, tokenizer = golden
    seed, text, ends, cap = STREAMS[1]
    engine = TTSEngine(tts, tokenizer, max_batch=2)
    feed = TextFeed()
    handle = engine.submit(TTSStreamRequest(speaker(tts, seed), feed, EndsAt(seed, ends), max_new_tokens=cap))

    def feeder():
        for piece in as_text_rounds(text):
            feed.put(piece)
        feed.close()

    thread = threading.Thread(target=feeder)
    thread.start()
    got = engine_chunks(tts, vocos, handle)
    thread.join()
    assert_same(got, expected[1], STREAMS[1])
    aborted = engine.submit(TTSStreamRequest(speaker(tts, 3), TextFeed(["a few words"]), EndsAt(3), max_new_tokens=60))
    aborted.abort()  # a row waiting for text that never comes: the abort wakes the engine and frees the slot
    events = [type(event).__name__ for event in aborted.pieces()]
    assert events in ([], ["SegmentStart"]) and aborted.reason == "abort"  # admitted or not by then
    engine.close()
    assert engine.pool.free_slots == engine.pool.slots


def test_streams_on_a_fixed_shape_runner_give_the_loop_chunks(golden, expected, monkeypatch):
    """The step over the whole capacity (what a CUDA graph captures), replayed by the CPU stand-in."""
    from graph_stand_in import graph_runner_on_cpu

    tts, vocos, tokenizer = golden
    runner = graph_runner_on_cpu(monkeypatch, "TTS batch")
    engine = TTSEngine(tts, tokenizer, threaded=False, runner=runner, max_batch=2)
    handles = [engine.submit(stream_request(tts, *case)) for case in STREAMS[:2]]
    for handle, case, chunks in zip(handles, STREAMS[:2], expected[:2]):
        assert_same(engine_chunks(tts, vocos, handle), chunks, case)
    assert runner.captured >= 1


def loop_codes(tts, tokenizer, seed, text, ends, cap, device):
    """Each segment's codes from the streaming schedule run by the frame loop on ``device`` (no vocoder)."""
    from minicpmo_cli.generation.speech import OUTPUT_CHUNK_FRAMES, StreamingSpeech, StreamSegment
    from minicpmo_cli.generation.tts_decode import FrameSampling, iter_frames

    sampling = FrameSampling.for_tts(tts, sampler=EndsAt(seed, ends))
    speech_ = StreamingSpeech(tts, None, tokenizer, speaker(tts, seed).to(device), sampling, cap)
    pieces, previous, codes = iter(as_text_rounds(text)), None, []
    while True:
        segment = StreamSegment(speech_, previous)
        for _ in segment.schedule(pieces):
            for _ in iter_frames(tts, segment.state, sampling, segment.text_mask(), OUTPUT_CHUNK_FRAMES):
                pass
        codes.append(segment.state.new_ids.cpu())
        if segment.next_segment is None:
            return codes
        previous = segment.next_segment


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_streams_batched_give_the_loop_codes_on_each_device(golden, device):
    """float32 on ``device``: each segment's codes of streamed rows against the frame loop on that device."""
    tts, _, tokenizer = golden
    tts = tts.to(device)
    try:
        engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=4)
        handles = [engine.submit(TTSStreamRequest(speaker(tts, seed).to(device), as_text_rounds(text),
                                                  EndsAt(seed, ends), max_new_tokens=cap))
                   for seed, text, ends, cap in STREAMS[:2]]
        for handle, case in zip(handles, STREAMS[:2]):
            got = [event.new_ids.cpu() for event in handle.pieces() if type(event).__name__ == "SegmentEnd"]
            want = loop_codes(tts, tokenizer, *case, device)
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), case
    finally:
        tts.cpu()
