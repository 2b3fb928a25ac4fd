"""The LLM engine's KV slots (generation/kv_pool.py, generation/engine.py) on the golden checkpoint: every
request gives the ids it gives alone, whatever else shares the batch, whenever it joins, however it is
prefilled; slots are reused without reallocating the buffers; what does not fit is refused before memory is
taken. Equality is of ids (exact)."""

from __future__ import annotations

import pytest
import torch

from minicpmo_cli.generation.decode import DecodeSettings, generate_ids, split_rows
from minicpmo_cli.generation.engine import ContextTooLong, EngineFull, LLMEngine, Request
from minicpmo_cli.generation.kv_pool import KVPool, lengths_mask, slot_bucket
from tests.model.graph_stand_in import graph_runner_on_cpu

MESSAGES = ["hello there, how are you?", "tell me a long story about cats and dogs", "hi",
            "what is the capital of france? answer in one word please"]


@pytest.fixture(scope="module")
def model(golden_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def rows(model):
    msgs = [[{"role": "user", "content": text}] for text in MESSAGES]
    inputs = model.processor.apply_chat_template(msgs=msgs)
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    return split_rows(embeds, inputs["attention_mask"])


def stops(model):
    tokenizer = model.processor.tokenizer
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))


def alone(model, prompt, settings, seed=None):
    return generate_ids(model.llm, prompt[None], None, settings, seed=seed)[0]


def engine(model, **kwargs):
    return LLMEngine(model.llm, threaded=False, **kwargs)


GREEDY = DecodeSettings(max_new_tokens=20)
SAMPLED = DecodeSettings(sampling=True, temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.05,
                         max_new_tokens=20)


def test_rows_with_their_own_settings_and_seeds_give_their_ids_alone(model, rows):
    """Greedy, penalised, banned-stop and seeded sampled rows in one batch: each row's ids are its alone ids."""
    stop = stops(model)
    settings = [GREEDY.with_(stop_ids=stop), SAMPLED.with_(stop_ids=stop),
                GREEDY.with_(repetition_penalty=1.3, min_new_tokens=5, stop_ids=stop),
                DecodeSettings(sampling=True, top_k=5, temperature=1.3, max_new_tokens=14, stop_ids=stop)]
    seeds = [None, 11, None, 12]
    expected = [alone(model, row, s, seed) for row, s, seed in zip(rows, settings, seeds)]
    llm = engine(model)
    handles = [llm.submit(Request(row, s, seed=seed)) for row, s, seed in zip(rows, settings, seeds)]
    assert [h.result() for h in handles] == expected
    assert llm.pool.slots == 4 and all(not used for used in llm.pool.used)


def test_a_row_prefilled_into_a_slot_while_others_decode_gives_its_alone_ids(model, rows):
    settings = GREEDY.with_(stop_ids=stops(model), max_new_tokens=24)
    expected = [alone(model, row, settings) for row in rows]
    llm = engine(model, max_batch=4)
    first = [llm.submit(Request(row, settings)) for row in rows[:2]]
    for _ in range(5):  # the first two are mid-decode
        llm.step()
    assert all(not h.done for h in first) and llm.pool.lengths[0] > rows[0].shape[0]
    buffers = [k.data_ptr() for k in llm.pool.keys]
    later = [llm.submit(Request(row, settings)) for row in rows[2:]]
    results = [h.result() for h in first + later]
    assert results == expected
    # the pool was made for the first two; the later two took a bigger pool once (a new bucket)
    assert llm.pool.slots == 4 and [k.data_ptr() for k in llm.pool.keys] != buffers


def test_a_finished_row_is_a_free_slot_reused_without_moving_the_buffers(model, rows):
    settings = GREEDY.with_(stop_ids=stops(model), max_new_tokens=6)
    llm = engine(model, max_batch=2)
    expected = [alone(model, row, settings) for row in rows]
    handles = [llm.submit(Request(row, settings)) for row in rows[:2]]
    while not llm.pool or not any(llm.pool.used):
        llm.step()
    pool, buffers = llm.pool, [k.data_ptr() for k in llm.pool.keys]
    handles += [llm.submit(Request(row, settings)) for row in rows[2:]]  # wait for a free slot
    assert llm.stats().waiting == 2 and llm.stats().slots_total == 2
    assert [h.result() for h in handles] == expected
    assert llm.pool is pool and [k.data_ptr() for k in llm.pool.keys] == buffers
    stats = llm.stats()
    assert stats.running == stats.waiting == stats.slots_used == 0
    assert stats.generation_tokens_total == sum(len(ids) for ids in expected)
    assert stats.prompt_tokens_total == sum(row.shape[0] for row in rows)


def test_a_long_prompt_prefilled_in_chunks_gives_the_same_ids(model, rows):
    settings = GREEDY.with_(stop_ids=stops(model))
    prompt = rows[1]
    expected = alone(model, prompt, settings)
    llm = engine(model, prefill_chunk=4)
    other = llm.submit(Request(rows[2], settings))
    while 0 not in llm.scheduler.running or not llm.scheduler.running[0].decoding:
        llm.step()
    handle = llm.submit(Request(prompt, settings))
    llm.step()  # its first chunk; the other row decodes on
    assert llm.scheduler.running[1].prefilled == 4 and not handle.done
    assert handle.result() == expected and other.result() == alone(model, rows[2], settings)


def test_seeded_sampling_is_the_same_alone_and_batched_in_any_order(model, rows):
    settings = SAMPLED.with_(stop_ids=stops(model))
    expected = alone(model, rows[0], settings, seed=5)
    for order in ([0, 1, 2], [2, 1, 0]):
        llm = engine(model)
        handles = {i: llm.submit(Request(rows[i], settings, seed=5 if i == 0 else 100 + i)) for i in order}
        assert handles[0].result() == expected


def test_streamed_ids_and_abort(model, rows):
    settings = GREEDY.with_(stop_ids=stops(model), max_new_tokens=12)
    llm = engine(model)
    seen = []
    handle = llm.submit(Request(rows[0], settings, on_tokens=seen.extend))
    aborted = llm.submit(Request(rows[1], settings))
    llm.step()
    llm.abort(aborted)
    assert list(handle.tokens()) == handle.result() == seen == alone(model, rows[0], settings)
    assert aborted.finish_reason == "abort" and handle.finish_reason in ("stop", "length")
    assert not any(llm.pool.used)


def test_abort_mid_prefill_frees_the_slot(model, rows):
    settings = GREEDY.with_(stop_ids=stops(model))
    llm = engine(model, prefill_chunk=3)
    handle = llm.submit(Request(rows[1], settings))
    llm.step()
    assert llm.scheduler.running and not handle.done
    llm.abort(handle)
    llm.step()
    assert handle.finish_reason == "abort" and not any(llm.pool.used) and llm.idle


def test_refused_before_memory_is_taken(model, rows):
    llm = engine(model, max_waiting=1, context=64)
    with pytest.raises(ContextTooLong, match="beyond the model's context of 64"):
        llm.submit(Request(rows[0], DecodeSettings(max_new_tokens=64)))
    assert llm.pool is None and not llm.scheduler.waiting
    llm.submit(Request(rows[0], DecodeSettings(max_new_tokens=4)))
    with pytest.raises(EngineFull):
        llm.submit(Request(rows[2], DecodeSettings(max_new_tokens=4)))


def test_a_threaded_engine_serves_concurrent_callers_as_alone(model, rows):
    import threading

    settings = GREEDY.with_(stop_ids=stops(model))
    expected = [alone(model, row, settings) for row in rows]
    llm = LLMEngine(model.llm, threaded=True)
    results = [None] * len(rows)

    def call(index):
        results[index] = generate_ids(model.llm, rows[index][None], None, settings, engine=llm)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


def test_pool_pieces():
    assert [slot_bucket(n) for n in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]
    mask = lengths_mask(torch.tensor([0, 2]), 4)
    assert mask.shape == (2, 1, 1, 4)
    assert mask[:, 0, 0].tolist() == [[True, False, False, False], [True, True, True, False]]

    class Config:
        num_key_value_heads, num_attention_heads, hidden_size, num_hidden_layers = 2, 4, 16, 3

    pool = KVPool.empty(Config, 2, 256, torch.float32, "cpu")
    assert pool.alloc() == 0 and pool.alloc() == 1 and pool.alloc() is None
    pool.keys[1][1, :, :5] = 1.0
    pool.lengths[1] = 5
    pool.free(0)
    assert pool.alloc() == 0 and pool.span() == 2
    bigger = pool.grown(3, 300)
    assert (bigger.slots, bigger.capacity) == (4, 512) and bigger.generation != pool.generation
    assert torch.equal(bigger.keys[1][:2, :, :256], pool.keys[1]) and bigger.lengths[:2] == pool.lengths


def test_graph_runner_keys_follow_the_pool_and_growth_never_replays_old_buffers(model, rows, monkeypatch):
    settings = GREEDY.with_(stop_ids=stops(model), max_new_tokens=16)
    expected = [alone(model, row, settings) for row in rows]
    runner = graph_runner_on_cpu(monkeypatch)
    llm = LLMEngine(model.llm, runner=runner, threaded=False)
    first = llm.submit(Request(rows[0], settings))
    for _ in range(4):
        llm.step()
    old = llm.pool.generation
    assert runner.captured == 1 and {key[-1] for key in runner._graphs} == {old}
    late = [llm.submit(Request(row, settings)) for row in rows[1:]]  # the pool grows: new buffers
    assert [h.result() for h in [first, *late]] == expected
    assert llm.pool.generation != old and all(key[-1] != old for key in runner._graphs)
    assert {key[:2] for key in runner._graphs} <= {(1, 256), (2, 256), (4, 256)}


def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(model, rows, monkeypatch, caplog):
    from minicpmo_cli.generation import step_runner

    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step_runner, "_Graph", refuse)
    monkeypatch.setattr(step_runner.torch.cuda, "graph_pool_handle", lambda: None)
    settings = GREEDY.with_(stop_ids=stops(model), max_new_tokens=8)
    runner = step_runner.StepRunner("graph")
    llm = LLMEngine(model.llm, runner=runner, threaded=False)
    caplog.set_level("WARNING", logger=step_runner.__name__)
    assert llm.submit(Request(rows[0], settings)).result() == alone(model, rows[0], settings)
    assert runner.captured == 0 and len(runner._uncapturable) == 1
    assert caplog.text.count("cannot be captured as a CUDA graph") == 1  # said once, not per step


def test_cli_refuses_an_answer_beyond_the_context_in_one_line(tiny_ckpt):
    from tests.conftest import run_cli_process

    result = run_cli_process("--model", tiny_ckpt, "--device", "cpu", "chat", "hi", "--max-new-tokens", "40000",
                             "--no-sampling", "--num-beams", "1")
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    # The prompt-size check (processing/limits.py) says it before the engine's own refusal would
    assert "--max-new-tokens is 40000" in lines[0] and "context holds 4096 tokens" in lines[0]


def test_a_cancellable_call_raises_an_engine_failure(model, rows):
    """generate_ids with a cancel event (the server's calls) reports a failed step as result() does, instead of
    returning the ids decoded so far as if the answer had ended."""
    import threading

    llm = engine(model)
    step, calls = llm._step, []

    def failing_after_prefill():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the step failed")
        return step()

    llm._step = failing_after_prefill
    settings = GREEDY.with_(stop_ids=stops(model))
    with pytest.raises(RuntimeError, match="the step failed"):
        generate_ids(model.llm, rows[0][None], None, settings, engine=llm, cancel=threading.Event())


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
def test_a_seeded_request_draws_what_the_seeded_global_generator_would(model, rows, seed):
    """A request's own generator seeded with s draws what torch.manual_seed(s) makes the global one draw, so a
    seed gives the ids it gave when the api seeded the global generator (and transformers generate's ids,
    tests/model/test_decode_core.py), now without touching the global state other requests draw from."""
    probs = torch.softmax(torch.randn(4, 50), dim=-1)
    torch.manual_seed(seed)
    expected = torch.multinomial(probs, 3), torch.multinomial(probs, 1)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(probs, 3, generator=generator), torch.multinomial(probs, 1, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    settings = SAMPLED.with_(stop_ids=stops(model))
    torch.manual_seed(seed)
    global_ids = generate_ids(model.llm, rows[1][None], None, settings)[0]
    torch.manual_seed(seed + 1)  # the global state no longer matters
    assert alone(model, rows[1], settings, seed=seed) == global_ids



def test_the_pool_stays_within_its_kv_budget_and_requests_wait_for_room(model, rows):
    """A budget of two 256-position slots: four requests decode two at a time, each as alone; one whose
    positions alone are over the budget is refused before any memory is taken."""
    from minicpmo_cli.generation.kv_budget import position_bytes

    per_position = position_bytes(model.llm.config, 4)
    budget = 2 * 256 * per_position
    settings = GREEDY.with_(stop_ids=stops(model), max_new_tokens=12)
    expected = [alone(model, row, settings) for row in rows]
    llm = engine(model, max_batch=16, kv_budget=budget)
    with pytest.raises(ContextTooLong, match="of KV cache, more than its budget"):
        llm.submit(Request(rows[0], settings.with_(max_new_tokens=600)))
    assert llm.pool is None  # refused before any memory was taken
    handles = [llm.submit(Request(row, settings)) for row in rows]
    most = 0
    while not all(h.done for h in handles):
        llm.step()
        most = max(most, llm.stats().kv_bytes)
        assert llm.stats().running <= 2
    assert [h.result() for h in handles] == expected
    assert most <= budget and llm.stats().kv_budget_bytes == budget


def test_an_idle_pool_is_made_anew_for_a_request_the_budget_cannot_grow_it_for(model, rows):
    """Four 256-position slots fill the budget; a request needing 512 positions cannot grow that pool beside
    the old one, so it is made anew (the old buffers freed first) once the pool is idle."""
    from minicpmo_cli.generation.kv_budget import position_bytes

    budget = 4 * 256 * position_bytes(model.llm.config, 4)
    short = GREEDY.with_(stop_ids=stops(model), max_new_tokens=4)
    llm = engine(model, max_batch=4, kv_budget=budget)
    assert [llm.submit(Request(row, short)).result() for row in rows[:1]]
    llm.submit(Request(rows[1], short))
    llm.step()
    assert llm.pool.slots == 1 and llm.pool.capacity == 256
    long = short.with_(max_new_tokens=300)
    handle = llm.submit(Request(rows[2], long))
    assert handle.result() == alone(model, rows[2], long)
    assert llm.pool.capacity == 512 and llm.stats().kv_bytes <= budget


def test_many_streams_get_their_first_id_at_once_then_a_few_steps_at_a_time(model, rows):
    """Eight streaming rows: each first id is handed over the step it is chosen, later ones every
    stream_interval(8) = 4 steps (one read-back and one wakeup per stream per four steps); the ids are the same."""
    from minicpmo_cli.generation.engine import stream_interval

    assert [stream_interval(n) for n in (1, 2, 4, 7, 8, 16, 1000)] == [1, 1, 2, 3, 4, 8, 8]
    settings = GREEDY.with_(max_new_tokens=10)
    expected = [alone(model, rows[i % 4], settings) for i in range(8)]
    llm = engine(model, max_batch=8, stream_period=0)  # no pacing by the clock (test_paced_streams_...)
    handles = [llm.submit(Request(rows[i % 4], settings, stream=True)) for i in range(8)]
    llm.step()  # all eight prefilled, their first ids chosen and handed over
    assert [len(h.ids) for h in handles] == [1] * 8
    for _ in range(3):
        llm.step()
        assert [len(h.ids) for h in handles] == [1] * 8
    llm.step()
    assert [len(h.ids) for h in handles] == [5] * 8
    assert [h.result() for h in handles] == expected


def test_paced_streams_get_their_ids_at_most_once_a_period_and_all_at_the_end(model, rows):
    """Eight streams (over PACED_ABOVE): each reader gets its first id at once, then ids at most once per
    stream_period of the engine's clock (read back meanwhile, they wait in the row), and the rest when its
    request finishes; the ids are the same."""
    settings = GREEDY.with_(max_new_tokens=12)
    expected = [alone(model, rows[i % 4], settings) for i in range(8)]
    now = [100.0]
    llm = engine(model, max_batch=8, stream_period=1.0, clock=lambda: now[0])
    handles = [llm.submit(Request(rows[i % 4], settings, stream=True)) for i in range(8)]
    readers = [h.batches() for h in handles]
    llm.step()
    assert [next(r) for r in readers] == [e[:1] for e in expected]  # the first ids at once
    for _ in range(7):
        llm.step()  # ids read back every 4 steps (stream_interval(8)), none handed over: the period runs
    assert all(h._queue.empty() for h in handles) and all(len(h.ids) == 5 for h in handles)
    now[0] += 1.0
    llm.step()
    assert [next(r) for r in readers] == [e[1:9] for e in expected]  # everything read back, in one batch
    while not llm.idle:
        llm.step()  # no clock move: the last ids come with the finish
    assert [list(r) for r in readers] == [[e[9:]] for e in expected]
    assert [h.result() for h in handles] == expected
