"""The TTS engine (generation/tts_engine.py) against the one-at-a-time loop (generation/speech.py
``generate_codes``): several utterances in one batched step, each with its own seed, text length and frame
budget, must give each the codes it gets alone; so must a request admitted while others are mid-decode, a
request of several pieces sharing one random stream, and rows on torch's global stream. Abort and cancel
free the slot for the next request; a step runner with fixed shapes (the form CUDA graphs capture) gives the
eager codes."""

from __future__ import annotations

import threading

import pytest
import torch

from minicpmo_cli.generation.speech import generate_codes, make_sampler
from minicpmo_cli.generation.tts_engine import TTSEngine, TTSPiece, TTSRequest
from minicpmo_cli.model.tts_sampling import FrameBudget


TEXTS = ("hi.", "hello world, the voice.", "hello world, the voice of the helpful assistant. " * 3,
         "a longer piece of text, read in one go by the model, with commas, and more words than the others.")
CASES = [(0, TEXTS[0], 30), (1, TEXTS[1], 25), (7, TEXTS[2], 61), (1234, TEXTS[3], 80), (5, TEXTS[1], 7),
         (9, TEXTS[3], 44)]


def speaker(tts, seed):
    return torch.randn(1, tts.config.llm_dim, generator=torch.Generator().manual_seed(seed))


def alone(tts, tokenizer, seed, text, limit):
    return generate_codes(tts, tokenizer, speaker(tts, seed), text, sampler=FrameBudget(make_sampler(seed), limit))


def request(tts, seed, text, limit, **extra):
    return TTSRequest(speaker(tts, seed), [TTSPiece(text, FrameBudget(make_sampler(seed), limit))], **extra)


def test_rows_batched_give_their_codes_alone(golden_tts):
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=8)
    handles = [engine.submit(request(tts, *case)) for case in CASES]
    for handle, case in zip(handles, CASES):
        [codes] = handle.result()
        assert handle.reason == "stop"
        assert torch.equal(codes, alone(tts, tokenizer, *case)), case
    assert engine.stats.peak_rows == len(CASES)  # they really shared the steps
    assert engine.stats.frames_together > engine.stats.frames // 2  # and most draws' probabilities
    assert engine.pool.free_slots == engine.pool.slots


def test_a_request_joining_mid_decode_and_refilled_slots(golden_tts):
    """Two slots for five requests: each finished row is refilled while the other is mid-call."""
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=2)
    first = engine.submit(request(tts, *CASES[2]))
    for _ in range(13):  # the first row is inside its first call when the others arrive
        engine.step()
    later = [engine.submit(request(tts, *case)) for case in (CASES[0], CASES[3], CASES[4], CASES[5])]
    assert torch.equal(first.result()[0], alone(tts, tokenizer, *CASES[2]))
    for handle, case in zip(later, (CASES[0], CASES[3], CASES[4], CASES[5])):
        assert torch.equal(handle.result()[0], alone(tts, tokenizer, *case)), case
    assert engine.pool.slots == 2 and engine.stats.peak_rows == 2


def test_pieces_of_one_request_share_their_stream_as_in_order(golden_tts):
    tts, tokenizer = golden_tts
    spk = speaker(tts, 3)
    draws = make_sampler(3)
    expected = [generate_codes(tts, tokenizer, spk, text, sampler=FrameBudget(draws, limit))
                for text, limit in ((TEXTS[1], 12), (TEXTS[0], 31))]
    engine = TTSEngine(tts, tokenizer, threaded=False)
    draws = make_sampler(3)
    other = engine.submit(request(tts, *CASES[3]))
    pieces = [TTSPiece(TEXTS[1], FrameBudget(draws, 12)), TTSPiece(TEXTS[0], FrameBudget(draws, 31))]
    handle = engine.submit(TTSRequest(spk, pieces))
    got = list(handle.pieces())
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(other.result()[0], alone(tts, tokenizer, *CASES[3]))


def test_rows_on_the_global_stream_are_checked_every_frame(golden_tts):
    """Unseeded rows draw from torch's global RNG: alone, one such row draws what the loop draws."""
    tts, tokenizer = golden_tts
    torch.manual_seed(11)
    expected = generate_codes(tts, tokenizer, speaker(tts, 2), TEXTS[1], sampler=FrameBudget(make_sampler(None), 33))
    engine = TTSEngine(tts, tokenizer, threaded=False)
    torch.manual_seed(11)
    handle = engine.submit(TTSRequest(speaker(tts, 2), [TTSPiece(TEXTS[1], FrameBudget(make_sampler(None), 33))]))
    assert torch.equal(handle.result()[0], expected)


def test_abort_and_cancel_free_the_slot_for_the_next(golden_tts):
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=1)
    cancel = threading.Event()
    aborted = engine.submit(request(tts, 0, TEXTS[2], 200))
    cancelled = engine.submit(request(tts, 1, TEXTS[2], 200, cancel=cancel))
    waiting = engine.submit(request(tts, *CASES[1]))
    for _ in range(8):
        engine.step()
    assert aborted.reason is None and engine.pool.free_slots == 0
    aborted.abort()
    engine.step()  # the abort frees the slot; the next request is admitted into it
    assert aborted.reason == "abort" and 1 <= aborted.codes[0].shape[1] <= 8
    assert engine.running and next(iter(engine.running.values())).handle is cancelled
    cancel.set()
    assert torch.equal(waiting.result()[0], alone(tts, tokenizer, *CASES[1]))
    # admitted and one frame drawn in the step that freed the slot, then cancelled at the next step
    assert cancelled.reason == "abort" and [c.shape[1] for c in cancelled.codes] == [1]
    assert engine.pool.free_slots == engine.pool.slots


def test_a_threaded_engine_serves_concurrent_callers_as_alone(golden_tts):
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, max_batch=4)
    results = {}

    def caller(case):
        results[case] = engine.submit(request(tts, *case)).result()[0]

    threads = [threading.Thread(target=caller, args=(case,)) for case in CASES[:4]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for case in CASES[:4]:
        assert torch.equal(results[case], alone(tts, tokenizer, *case)), case
    engine.close()


def test_a_fixed_shape_runner_gives_the_eager_codes(golden_tts, monkeypatch):
    """The step over the whole capacity with a mask (what a graph captures), replayed by the CPU stand-in."""
    from graph_stand_in import graph_runner_on_cpu

    tts, tokenizer = golden_tts
    runner = graph_runner_on_cpu(monkeypatch, "TTS batch")
    engine = TTSEngine(tts, tokenizer, threaded=False, runner=runner, max_batch=4)
    handles = [engine.submit(request(tts, *case)) for case in CASES[:3]]
    for handle, case in zip(handles, CASES[:3]):
        assert torch.equal(handle.result()[0], alone(tts, tokenizer, *case)), case
    assert runner.captured >= 1


def test_a_row_outgrowing_the_pool_moves_every_row_to_a_longer_one(golden_tts):
    """A long row needs more positions than the first pool holds: the pool is replaced by a longer one (the
    slots' positions copied) and every row still gets its codes alone."""
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=2)
    cases = [(21, TEXTS[1], 210), (22, TEXTS[3], 120)]
    handles = [engine.submit(request(tts, *case)) for case in cases]
    first_capacity, capacities = None, []
    while not all(handle.done for handle in handles):
        engine.step()
        first_capacity = first_capacity or engine.pool.capacity
        capacities.append(engine.pool.capacity)
    assert max(capacities) > first_capacity
    for handle, case in zip(handles, cases):
        assert torch.equal(handle.result()[0], alone(tts, tokenizer, *case)), case


def run_counting_bytes(engine, handles):
    """Step ``engine`` until ``handles`` are done; the most bytes its pool held meanwhile."""
    peak = engine.pool_bytes
    while not all(handle.done for handle in handles):
        engine.step()
        peak = max(peak, engine.pool_bytes)
    return peak


def test_the_pool_never_grows_past_its_cap_and_rows_wait_instead(golden_tts):
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=8, max_positions=2 * 512)
    cases = [CASES[0], CASES[1], CASES[4], CASES[5]]
    handles = [engine.submit(request(tts, *case)) for case in cases]
    engine.step()
    per_position = engine.pool_bytes // (engine.pool.slots * engine.pool.capacity)
    peak = run_counting_bytes(engine, handles)
    assert 0 < peak <= 2 * 512 * per_position and engine.stats.peak_rows == 2  # the others waited
    now = engine.snapshot()
    assert (now.running, now.waiting, now.slots_total, now.pool_bytes) == (0, 0, 2, engine.pool_bytes)
    assert now.frames == engine.stats.frames > 0 and now.finished == len(cases)
    for handle, case in zip(handles, cases):
        assert torch.equal(handle.result()[0], alone(tts, tokenizer, *case)), case


def test_a_longer_pool_keeps_only_the_slots_the_cap_holds(golden_tts):
    """One long row outlives three short ones, then needs a longer capacity: the longer pool drops the free
    slots at the top that would take it past the cap (without that: 4 x 768 positions, over 4 x 512)."""
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=4, max_positions=4 * 512)
    cases = [(21, TEXTS[1], 210), CASES[0], CASES[1], CASES[4]]
    handles = [engine.submit(request(tts, *case)) for case in cases]
    engine.step()
    per_position = engine.pool_bytes // (engine.pool.slots * engine.pool.capacity)
    assert engine.pool.slots == 4 and engine.stats.peak_rows == 4
    peak = run_counting_bytes(engine, handles)
    assert engine.pool.capacity > 512 and engine.pool.slots < 4  # it grew longer, with fewer slots
    assert peak <= 4 * 512 * per_position
    for handle, case in zip(handles, cases):
        assert torch.equal(handle.result()[0], alone(tts, tokenizer, *case)), case


def test_no_slot_count_given_means_the_default(golden_tts):
    """A server whose LLM slots come from a memory budget passes no count (None): the TTS's default."""
    from minicpmo_cli.generation.tts_engine import MAX_BATCH

    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=None)
    handle = engine.submit(request(tts, *CASES[4]))
    assert engine.max_batch == MAX_BATCH and torch.equal(handle.result()[0], alone(tts, tokenizer, *CASES[4]))


def test_an_idle_pool_shrinks_back_and_the_codes_stay(golden_tts):
    tts, tokenizer = golden_tts
    engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=4, idle_positions=512)
    handles = [engine.submit(request(tts, *case)) for case in CASES[:4]]
    peak = run_counting_bytes(engine, handles)
    assert engine.stats.peak_rows == 4 and engine.pool.slots * engine.pool.capacity == 512
    assert engine.pool_bytes * 4 <= peak  # a quarter at most: one slot of the first capacity
    again = [engine.submit(request(tts, *case)) for case in CASES[:4]]  # the pool grows again from there
    run_counting_bytes(engine, again)
    for handle, case in zip(handles + again, CASES[:4] * 2):
        assert torch.equal(handle.result()[0], alone(tts, tokenizer, *case)), case


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_draws_on_cuda_equal_the_cpu_draws():
    """The sampler's numbers reach the GPU through pinned memory, asynchronously: the same draws."""
    from minicpmo_cli.model.tts_sampling import ReferenceSampler

    probs = torch.softmax(torch.randn(4, 626, generator=torch.Generator().manual_seed(0)), dim=-1)
    on_cpu, on_cuda = ReferenceSampler(seed=4), ReferenceSampler(seed=4)
    for _ in range(20):
        assert torch.equal(on_cpu.sample(probs), on_cuda.sample(probs.cuda()).cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_batched_on_cuda_give_their_codes_alone(golden_tts):
    """float32 on the GPU: the batched step's rows against the one-at-a-time loop on the same device."""
    tts, tokenizer = golden_tts
    tts = tts.cuda()
    try:
        engine = TTSEngine(tts, tokenizer, threaded=False, max_batch=8)
        handles = [engine.submit(request(tts, *case)) for case in CASES]
        for handle, (seed, text, limit) in zip(handles, CASES):
            expected = generate_codes(tts, tokenizer, speaker(tts, seed).cuda(), text,
                                      sampler=FrameBudget(make_sampler(seed), limit))
            assert torch.equal(handle.result()[0], expected), seed
    finally:
        tts.cpu()
