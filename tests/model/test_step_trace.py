"""The LLM engine's traced decode step on the CPU (generation/step_trace.py, step mode ``trace``, the CPU
default): the same ids as the eager engine for rows that join, finish and share the batch; the logits and KV
writes of one step bit-identical to the eager step of the same form; one TorchScript call that leaves the GIL
to other threads (its ops run in C++, not one Python call each); traces that outlive a pool's growth; a step
that cannot be traced runs eagerly, with the same ids."""

from __future__ import annotations

import pytest
import torch

from minicpmo_cli.generation.decode import DecodeSettings, split_rows
from minicpmo_cli.generation.engine import LLMEngine, Request
from minicpmo_cli.generation.kv_pool import lengths_mask
from minicpmo_cli.generation.step_runner import StepRunner, resolve_step
from minicpmo_cli.generation.step_trace import TracedSteps, _slot_step

TEXTS = ["hello there, how are you?", "tell me a long story about cats and dogs", "hi",
         "what is the capital of france? answer in one word please", "count to five", "why is the sky blue?"]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(model):
    msgs = [[{"role": "user", "content": text}] for text in TEXTS]
    inputs = model.processor.apply_chat_template(msgs=msgs)
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    return split_rows(embeds, inputs["attention_mask"])


def run_engine(model, prompts, mode: str, max_batch: int,
               penalties=(1.0,)) -> tuple[list[list[int]], LLMEngine]:
    """Every prompt submitted at once (rows of different lengths and limits join as slots free up); with
    ``penalties``, rows take them in turn, and every other row bans its stop ids for 3 tokens."""
    engine = LLMEngine(model.llm, runner=StepRunner(mode), max_batch=max_batch, threaded=False)
    settings = [DecodeSettings(max_new_tokens=6 + 5 * index, repetition_penalty=penalties[index % len(penalties)],
                               min_new_tokens=3 * (index % 2) if len(penalties) > 1 else 0)
                for index in range(len(prompts))]
    handles = [engine.submit(Request(prompt, settings[index])) for index, prompt in enumerate(prompts)]
    while not engine.idle:
        engine.step()
    return [handle.ids for handle in handles], engine


def test_one_trace_serves_every_batch_and_window_bit_for_bit(model):
    """A kind of step is traced once, on its first call's batch and window; later calls with other batches
    and windows (wider and narrower) give the eager step's ids, flags, seen table and KV writes exactly."""
    from minicpmo_cli.generation.step_trace import _greedy_penalised_step

    llm, layers, vocab = model.llm, len(model.llm.model.layers), model.llm.lm_head.out_features
    generator = torch.Generator().manual_seed(0)

    def state(batch: int, width: int):
        buffers = [torch.randn(16, 2, 256, 32, generator=generator) for _ in range(2 * layers)]
        small = (torch.randint(0, vocab, (batch,), generator=generator),
                 torch.randint(0, width, (batch,), generator=generator), torch.rand(batch, generator=generator) < 0.8,
                 torch.rand(batch, generator=generator) < 0.2, torch.rand(batch, vocab, generator=generator) < 0.01,
                 torch.rand(batch, vocab, generator=generator) < 0.1, torch.full((batch, 1), 1.05))
        return small, buffers

    llm.requires_grad_(False)  # as the engine makes it: a trace holds the weights as constants
    steps = TracedSteps(llm)
    with torch.inference_mode():
        for batch, width in ((3, 37), (16, 200), (1, 5), (8, 129), (16, 256)):
            small, buffers = state(batch, width)
            mine = [t.clone() for t in (*small, *buffers)]
            got = steps.greedy_penalised(width, *mine[:7], mine[7:7 + layers], mine[7 + layers:])
            theirs = [t.clone() for t in (*small, *buffers)]
            expected = _greedy_penalised_step(llm, layers, *theirs[:7], torch.arange(width), *theirs[7:])
            assert torch.equal(got, expected), (batch, width)
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), (batch, width)
    assert steps.traced == 1


def test_cpu_default_is_trace():
    assert resolve_step(None, "cpu") == "trace"
    assert not StepRunner("trace").static_shapes  # the TTS and sessions keep their eager steps


@pytest.mark.parametrize("max_batch", [1, 4])
def test_traced_engine_gives_the_eager_ids(model, prompts, max_batch):
    eager, _ = run_engine(model, prompts, "eager", max_batch)
    traced, engine = run_engine(model, prompts, "trace", max_batch)
    assert traced == eager
    assert all(len(ids) == 6 + 5 * index for index, ids in enumerate(traced))  # no stop id in a random model
    assert engine.traced is not None and engine.traced.traced >= 1


@pytest.mark.parametrize("max_batch", [1, 4])
def test_penalised_and_banned_rows_give_the_eager_ids(model, prompts, max_batch):
    """Repetition penalties (1.05, 1.3, none) in one batch, and rows whose stop ids are banned for their first
    tokens (those steps choose outside the trace): the eager engine's ids."""
    eager, _ = run_engine(model, prompts, "eager", max_batch, penalties=(1.05, 1.3, 1.0))
    traced, engine = run_engine(model, prompts, "trace", max_batch, penalties=(1.05, 1.3, 1.0))
    assert traced == eager
    assert engine._seen is not None and engine.traced.traced >= 1


def test_traces_keep_working_over_a_grown_pool(model, prompts):
    """Two rows start in a small pool; two longer requests join and the pool is replaced by a bigger one (new
    buffers, more slots, a longer capacity): the traces made over the old buffers run over the new ones, and
    every row's ids are the eager engine's."""
    def run(mode: str):
        engine = LLMEngine(model.llm, runner=StepRunner(mode), max_batch=4, threaded=False)
        first = [engine.submit(Request(p, DecodeSettings(max_new_tokens=30))) for p in prompts[:2]]
        for _ in range(10):
            engine.step()
        generation, traced = engine.pool.generation, engine.traced.traced if engine.traced else 0
        later = [engine.submit(Request(p, DecodeSettings(max_new_tokens=300))) for p in prompts[2:4]]
        while not engine.idle:
            engine.step()
        return [h.ids for h in first + later], generation, engine, traced

    eager, _, _, _ = run("eager")
    ids, generation, engine, before = run("trace")
    assert ids == eager and engine.pool.generation != generation and before >= 1


def test_one_traced_step_is_bit_identical_to_the_eager_static_step(model, prompts):
    engine = LLMEngine(model.llm, runner=StepRunner("trace"), max_batch=4, threaded=False)
    for prompt in prompts[:3]:
        engine.submit(Request(prompt, DecodeSettings(max_new_tokens=20)))
    for _ in range(3):
        engine.step()
    pool = engine.pool
    span = pool.span()
    positions = torch.tensor([min(pool.lengths[slot], pool.capacity - 1) for slot in range(span)])
    tokens, mask = engine._next[:span].clone(), lengths_mask(positions, pool.capacity)
    keys = [k.clone() for k in pool.keys]
    values = [v.clone() for v in pool.values]
    with torch.inference_mode():
        expected = _slot_step(model.llm, len(keys), tokens, positions, mask, *keys, *values)
        steps = TracedSteps(model.llm)
        got = steps.run(tokens, positions, mask, pool.keys, pool.values)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip((*pool.keys, *pool.values), (*keys, *values)))


def test_a_traced_step_is_one_call_without_python_per_op(model, prompts):
    """An eager step makes each of its ~200 ops a Python-level torch call (each one lets go of the GIL and takes
    it back); a traced greedy step makes a handful: the forward pass and the choice run inside one TorchScript
    call."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    def python_ops_in_a_step(mode: str) -> int:
        engine = LLMEngine(model.llm, runner=StepRunner(mode), max_batch=4, threaded=False)
        for prompt in prompts[:4]:
            engine.submit(Request(prompt, DecodeSettings(max_new_tokens=50)))
        for _ in range(3):
            engine.step()  # admitted, prefilled, and the trace made
        Count.calls = 0
        with Count():
            engine.step()
        return Count.calls

    eager, traced = python_ops_in_a_step("eager"), python_ops_in_a_step("trace")
    assert traced * 5 < eager, (eager, traced)  # measured: 186 and 18 (slices, ids and flags made in Python)


def test_a_step_that_cannot_be_traced_runs_eagerly(model, prompts, monkeypatch, caplog):
    eager, _ = run_engine(model, prompts[:3], "eager", 4)

    def refuse(*args, **kwargs):
        raise RuntimeError("this op cannot be traced")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    with caplog.at_level("WARNING"):
        traced, engine = run_engine(model, prompts[:3], "trace", 4)
    assert traced == eager and engine.traced.traced == 0
    assert "cannot be traced" in caplog.text


def test_a_new_prompt_gets_its_first_id_before_the_running_rows_step(model, prompts):
    """While greedy rows decode, a request admitted in a step is prefilled, given its first id and read back
    before that step's decode: a 1-token request is done after one step, a stream has its first id; the rows
    that were decoding get their ids all the same (a step's writes into the new slot land past its prompt)."""
    eager, _ = run_engine(model, prompts[:3] + prompts[4:5], "eager", 4)
    engine = LLMEngine(model.llm, runner=StepRunner("trace"), max_batch=8, threaded=False)
    settings = [DecodeSettings(max_new_tokens=6 + 5 * index) for index in range(3)]
    running = [engine.submit(Request(prompt, settings[index])) for index, prompt in enumerate(prompts[:3])]
    for _ in range(4):
        engine.step()
    lengths = [engine.pool.lengths[row.slot] for row in engine.scheduler.running.values()]
    short = engine.submit(Request(prompts[4], DecodeSettings(max_new_tokens=1)))
    stream = engine.submit(Request(prompts[4], DecodeSettings(max_new_tokens=26), stream=True))
    seen_at_decode = []
    decode = engine._decode_greedy

    def watched(rows):
        seen_at_decode.append((short.done, list(stream.ids), len(rows)))
        return decode(rows)

    engine._decode_greedy = watched
    engine.step()
    assert seen_at_decode == [(True, eager[3][:1], 3)]  # done, and the first id out, before the decode
    assert short.result() == eager[3][:1]
    assert [engine.pool.lengths[row.slot] for row in engine.scheduler.running.values()][:3] == \
        [length + 1 for length in lengths]  # the running rows took this step too
    while not engine.idle:
        engine.step()
    assert [handle.result() for handle in running] == eager[:3]
    alone = LLMEngine(model.llm, runner=StepRunner("eager"), threaded=False)
    expected = alone.submit(Request(prompts[4], DecodeSettings(max_new_tokens=26)))
    while not alone.idle:
        alone.step()
    assert stream.result() == expected.result()


def test_the_steps_additive_mask_gives_sdpa_what_it_makes_of_the_boolean_one():
    """slot_step turns its boolean mask into the additive one once per step (not once per layer inside sdpa):
    the attention is bit-identical, and an absent or additive mask passes through."""
    import torch.nn.functional as F

    from minicpmo_cli.generation.forward import additive_mask

    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(5, 2, 2, 32, generator=generator), torch.randn(5, 2, 40, 32, generator=generator),
                         torch.randn(5, 2, 40, 32, generator=generator))
    mask = lengths_mask(torch.tensor([0, 7, 39, 20, 3]), 40)
    made = additive_mask(mask, torch.float32)
    assert made.dtype == torch.float32 and torch.equal(made == 0, mask) and torch.isneginf(made[~mask]).all()
    assert torch.equal(F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.17),
                       F.scaled_dot_product_attention(query, key, value, attn_mask=made, scale=0.17))
    assert additive_mask(None, torch.float32) is None and additive_mask(made, torch.float32) is made
