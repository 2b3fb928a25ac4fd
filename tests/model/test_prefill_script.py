"""The engine's scripted prompt pass on the CPU (generation/prefill_script.py, used in step mode ``trace``):
hidden states and KV writes bit-identical to the eager ``forward.forward`` into the same slot, for whole
prompts, one-position prompts and later chunks (with their mask); one call that leaves the GIL to other
threads; the eager pass where the layers are of another kind or hooked; the engine's ids unchanged."""

from __future__ import annotations

import pytest
import torch

from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.decode import DecodeSettings, split_rows
from minicpmo_cli.generation.engine import LLMEngine, Request
from minicpmo_cli.generation.kv_pool import KVPool
from minicpmo_cli.generation.prefill_script import ScriptedPrefill, layer_weights
from minicpmo_cli.generation.step_runner import StepRunner

TEXTS = ["hello there, how are you?", "tell me a long story about cats and dogs", "hi", "why is the sky blue?"]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from minicpmo_cli import MiniCPMO

    loaded = MiniCPMO.from_pretrained(tiny_ckpt, dtype=torch.float32)
    loaded.llm.requires_grad_(False)
    return loaded


def pool_for(llm, slots: int = 3, capacity: int = 64) -> KVPool:
    pool = KVPool.empty(llm.config, slots, capacity, torch.float32, torch.device("cpu"))
    for buffer in (*pool.keys, *pool.values):
        buffer.normal_()  # junk where nothing was written: a pass must not read it
    return pool


def chunk_inputs(begin: int, end: int, width: int = 128):
    positions = torch.arange(begin, end)[None]
    mask = None
    if begin > 0:
        keys = torch.arange(end)
        mask = (keys[None, :] <= positions[0, :, None])[None, None]
    return positions, mask


@pytest.mark.parametrize("own_rotary", [True, False])
@pytest.mark.parametrize("chunks", [[(0, 23)], [(0, 1)], [(0, 9), (9, 30)], [(0, 12), (12, 13), (13, 20)]])
def test_scripted_pass_equals_the_eager_pass_bit_for_bit(model, chunks, own_rotary):
    """Hidden states, last logits and every KV write equal; with the rotary inside the call (this
    transformers' default rope, checked when compiled) and with the model's rotary module making it."""
    llm = model.llm
    torch.manual_seed(0)
    embeds = torch.randn(chunks[-1][1], llm.config.hidden_size)
    eager, scripted = pool_for(llm), pool_for(llm)
    for buffer, other in zip((*eager.keys, *eager.values), (*scripted.keys, *scripted.values)):
        other.copy_(buffer)
    script = ScriptedPrefill(llm)
    slot = 1
    with torch.inference_mode():
        for begin, end in chunks:
            positions, mask = chunk_inputs(begin, end)
            view = eager.slot_view(slot)
            expected = fwd.forward(llm, embeds[None, begin:end], positions, view, mask)
            eager.sync_view(slot, view)
            last = llm.lm_head(expected[:, -1:]).float()[:, -1]
            for _ in range(3):  # the same every time (no profiled re-optimisation after the first runs)
                made = script.run([(embeds[None, begin:end], slot, begin)], scripted.keys, scripted.values)
                script._own_rotary = own_rotary
                assert made is not None and len(made) == 1
                assert torch.equal(made[0][0], expected) and torch.equal(made[0][1], last)
    for buffer, other in zip((*eager.keys, *eager.values), (*scripted.keys, *scripted.values)):
        assert torch.equal(buffer, other)  # the same writes, and nothing outside the slot's new positions


def test_several_chunks_in_one_call_equal_one_call_each(model):
    """The engine hands a step's prompt chunks over in one call: each into its own slot, as if one by one
    (a later chunk of one prompt among first chunks of others)."""
    llm = model.llm
    torch.manual_seed(1)
    prompts = [torch.randn(1, length, llm.config.hidden_size) for length in (5, 17, 1, 11)]
    one_by_one, together = pool_for(llm, slots=4), pool_for(llm, slots=4)
    for buffer, other in zip((*one_by_one.keys, *one_by_one.values), (*together.keys, *together.values)):
        other.copy_(buffer)
    script = ScriptedPrefill(llm)
    with torch.inference_mode():
        first = script.run([(prompts[3][:, :6], 3, 0)], one_by_one.keys, one_by_one.values)
        assert first is not None
        script.run([(prompts[3][:, :6], 3, 0)], together.keys, together.values)
        chunks = [(prompts[0], 0, 0), (prompts[1], 1, 0), (prompts[2], 2, 0), (prompts[3][:, 6:], 3, 6)]
        alone = [script.run([chunk], one_by_one.keys, one_by_one.values)[0] for chunk in chunks]
        made = script.run(chunks, together.keys, together.values)
    assert len(made) == 4
    for (hidden, last), (hidden_alone, last_alone) in zip(made, alone):
        assert torch.equal(hidden, hidden_alone) and torch.equal(last, last_alone)
    for buffer, other in zip((*one_by_one.keys, *one_by_one.values), (*together.keys, *together.values)):
        assert torch.equal(buffer, other)


def test_scripted_rotary_is_checked_against_the_models(model, monkeypatch):
    llm = model.llm
    embeds = torch.randn(1, 4, llm.config.hidden_size)
    pool = pool_for(llm)
    with torch.inference_mode():
        script = ScriptedPrefill(llm)
        assert script.run([(embeds, 0, 0)], pool.keys, pool.values) is not None
        assert script._own_rotary  # transformers' default rope, made by the same ops
        monkeypatch.setattr(llm.model.rotary_emb, "attention_scaling", 0.5)  # the model's now differs
        script = ScriptedPrefill(llm)
        script._compile(embeds)
        assert script._own_rotary  # the scaling is handed in: still the same
        monkeypatch.setattr(llm.model.rotary_emb, "rope_type", "dynamic")
        script = ScriptedPrefill(llm)
        script._compile(embeds)
        assert not script._own_rotary  # another rope kind: the model's module makes cos/sin


def test_hooked_or_other_layers_keep_the_eager_pass(model):
    llm = model.llm
    script = ScriptedPrefill(llm)
    pool = pool_for(llm)
    embeds = torch.randn(1, 5, llm.config.hidden_size)
    handle = llm.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    try:
        with torch.inference_mode():
            assert script.run([(embeds, 0, 0)], pool.keys, pool.values) is None
    finally:
        handle.remove()
    with torch.inference_mode():
        assert script.run([(embeds, 0, 0)], pool.keys, pool.values) is not None
    original = llm.model.layers[1].self_attn.o_proj
    llm.model.layers[1].self_attn.o_proj = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    try:
        assert layer_weights(llm) is None  # Qwen2's o_proj has no bias: another kind of layer
    finally:
        llm.model.layers[1].self_attn.o_proj = original
    assert layer_weights(llm) is not None


def test_scripted_pass_is_a_few_python_level_calls(model):
    """Each Python-level torch call lets go of the GIL and must take it back (beside a busy event loop, a
    switch interval each); the eager pass makes one per op, the scripted pass one."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    llm = model.llm
    pool = pool_for(llm)
    script = ScriptedPrefill(llm)
    positions, mask = chunk_inputs(0, 20)
    embeds = torch.randn(1, 20, llm.config.hidden_size)
    counts = {}
    with torch.inference_mode():
        script.run([(embeds, 0, 0)], pool.keys, pool.values)  # compiled
        for name in ("eager", "scripted"):
            Count.calls = 0
            with Count():
                if name == "eager":
                    fwd.forward(llm, embeds, positions, pool.slot_view(0), mask)
                else:
                    assert script.run([(embeds, 0, 0)], pool.keys, pool.values) is not None
            counts[name] = Count.calls
    assert counts["scripted"] * 20 < counts["eager"], counts  # measured: 166 and 0 (the call is not a torch function)


def test_engine_ids_are_the_eager_engines(model):
    msgs = [[{"role": "user", "content": text}] for text in TEXTS]
    inputs = model.processor.apply_chat_template(msgs=msgs)
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    prompts = split_rows(embeds, inputs["attention_mask"])
    results = {}
    for mode in ("eager", "trace"):
        engine = LLMEngine(model.llm, runner=StepRunner(mode), max_batch=4, threaded=False, prefill_chunk=7)
        handles = [engine.submit(Request(prompt, DecodeSettings(max_new_tokens=9))) for prompt in prompts]
        while not engine.idle:
            engine.step()
        results[mode] = [handle.ids for handle in handles]
        if mode == "trace":
            assert engine.scripted_prefill._fn is not None  # the prompts went through the scripted pass
    assert results["trace"] == results["eager"]
