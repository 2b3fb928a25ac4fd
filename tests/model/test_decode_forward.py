"""The eager decode step (generation/forward.py ``decode_step``) against transformers' ``Qwen2Model.forward``
on the same weights: logits and the written cache entries equal bit for bit, step after step, for a padded
batch (masked), one unpadded row and in bfloat16; the fallback for layer kinds it does not inline (quantized linears)
runs their own ``forward`` with the same result.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.decode import prefill, prompt_positions

MESSAGES = ["hello there, how are you?", "hi"]


@pytest.fixture(scope="module")
def model(golden_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(model):
    inputs = model.processor.apply_chat_template(msgs=[[{"role": "user", "content": t}] for t in MESSAGES])
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    return embeds, inputs["attention_mask"]


def transformers_steps(llm, embeds, mask, steps: int):
    """Greedy steps through ``llm.model`` with a DynamicCache, as ``generate`` makes them: logits per step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=llm.config)
    keyword = fwd.cache_keyword(type(llm.model))
    out = llm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                    position_ids=prompt_positions(mask, embeds.shape[1], embeds.device), **{keyword: cache})
    logits = llm.lm_head(out.last_hidden_state[:, -1:]).float()[:, -1]
    positions = (mask.long().sum(-1) if mask is not None else torch.full((embeds.shape[0],), embeds.shape[1]))
    result = []
    for _ in range(steps):
        tokens = logits.argmax(-1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = llm.model(inputs_embeds=llm.model.embed_tokens(tokens[:, None]), attention_mask=mask,
                        position_ids=positions[:, None], use_cache=True, **{keyword: cache})
        logits = llm.lm_head(out.last_hidden_state[:, -1:]).float()[:, -1]
        positions = positions + 1
        result.append(logits)
    return result, cache


def core_steps(llm, embeds, mask, steps: int):
    _, logits, cache = prefill(llm, embeds, mask, 256)
    positions = (mask.long().sum(-1) if mask is not None else torch.full((embeds.shape[0],), embeds.shape[1]))
    valid = None
    if mask is not None:
        valid = torch.ones(embeds.shape[0], cache.capacity, dtype=torch.bool)
        valid[:, :embeds.shape[1]] = mask.bool()
    result = []
    for _ in range(steps):
        tokens = logits.argmax(-1)
        step_mask = None if valid is None else valid[:, None, None, :cache.length + 1]
        logits = fwd.decode_step(llm, tokens, positions[:, None], cache, step_mask)
        positions = positions + 1
        result.append(logits)
    return result, cache


def assert_same(llm, embeds, mask, steps=6):
    with torch.inference_mode():
        theirs, their_cache = transformers_steps(llm, embeds, mask, steps)
        ours, our_cache = core_steps(llm, embeds, mask, steps)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max().item()}"
    for layer, view in enumerate(our_cache.layers):
        assert torch.equal(view.keys, their_cache.layers[layer].keys)
        assert torch.equal(view.values, their_cache.layers[layer].values)


def test_decode_step_equals_qwen2model_bit_for_bit_padded_batch(model, prompts):
    embeds, mask = prompts
    assert not bool(mask.all())  # the two prompts differ in length: left padding, the masked path
    assert_same(model.llm, embeds, mask)


def test_decode_step_equals_qwen2model_bit_for_bit_one_row(model, prompts):
    embeds, mask = prompts
    assert_same(model.llm, embeds[:1, mask[0].bool()], None)


def test_decode_step_equals_qwen2model_bit_for_bit_in_bfloat16(golden_ckpt, prompts):
    """bf16: the RMSNorm's casts are real here, and every rotary product rounds to bf16 in the same order."""
    from minicpmo_cli import MiniCPMO

    model = MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.bfloat16)
    embeds, mask = prompts
    assert model.llm.lm_head.weight.dtype == torch.bfloat16
    assert_same(model.llm, embeds.to(torch.bfloat16), mask)


class WrappedLinear(nn.Module):
    """A stand-in for a quantized linear: not an ``nn.Linear``, same arithmetic through its own forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_other_linear_kinds_run_their_own_forward(model, prompts, monkeypatch):
    embeds, mask = prompts
    llm = model.llm
    attn = llm.model.layers[0].self_attn
    calls = []
    wrapped = WrappedLinear(attn.q_proj)
    real_forward = wrapped.forward
    monkeypatch.setattr(wrapped, "forward", lambda x: calls.append(1) or real_forward(x))
    monkeypatch.setattr(attn, "q_proj", wrapped)
    assert_same(llm, embeds, mask, steps=3)
    assert calls  # the decode step went through the wrapper's forward


def test_forward_hooks_on_the_modules_it_calls_still_run(model, prompts):
    """The step skips ``nn.Module.__call__`` only for modules without hooks: a hook on ``lm_head`` (the server
    counts passes with one) sees the prefill and every decode step, and the ids stay those of generate."""
    from minicpmo_cli.generation.decode import DecodeSettings, generate_ids

    embeds, mask = prompts
    alone = embeds[:1, mask[0].bool()]
    settings = DecodeSettings(max_new_tokens=7, min_new_tokens=7, stop_ids=(0,))
    plain = generate_ids(model.llm, alone, None, settings)
    passes = []
    handle = model.llm.lm_head.register_forward_hook(lambda *args: passes.append(1))
    try:
        hooked = generate_ids(model.llm, alone, None, settings)
    finally:
        handle.remove()
    assert hooked == plain and len(plain[0]) == 7
    assert len(passes) == 7  # the prefill's pass and six decode steps
