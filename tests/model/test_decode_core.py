"""The decode core (generation/decode.py) against transformers ``generate`` on the same weights: greedy ids
identical (batch and batch 1), sampled ids identical with the same seed, each logits step equal to its
transformers processor; finished rows leave the batch without changing the others."""

from __future__ import annotations

import warnings

import pytest
import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation import decode, sampling
from minicpmo_cli.generation.decode import DecodeSettings, generate_ids
from minicpmo_cli.generation.static_cache import bucket_length

MESSAGES = ["hello there, how are you?", "tell me a long story about cats and dogs", "hi"]


@pytest.fixture(scope="module")
def model(golden_ckpt):
    from minicpmo_cli import MiniCPMO

    return MiniCPMO.from_pretrained(golden_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(model):
    msgs = [[{"role": "user", "content": text}] for text in MESSAGES]
    inputs = model.processor.apply_chat_template(msgs=msgs)
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    return embeds, inputs["attention_mask"]


def stops(model):
    tokenizer = model.processor.tokenizer
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def reference(model, embeds, mask, max_new_tokens, **kwargs):
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=0,
                                 eos_token_id=stops(model), max_new_tokens=max_new_tokens, **kwargs)
    return [cut(row, stops(model)) for row in out.tolist()]


def cut(row, stop_ids):
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def single(embeds, mask, row):
    keep = mask[row].bool()
    return embeds[row:row + 1, keep], None


@pytest.mark.parametrize("kwargs", [{}, {"min_new_tokens": 12}])
def test_greedy_ids_equal_generate_batched_and_one_by_one(model, prompts, kwargs):
    embeds, mask = prompts
    settings = DecodeSettings.from_kwargs(kwargs, 24, stops(model))
    ours = generate_ids(model.llm, embeds, mask, settings)
    assert ours == reference(model, embeds, mask, 24, **kwargs)
    for row in range(len(MESSAGES)):
        assert generate_ids(model.llm, *single(embeds, mask, row), settings) == [ours[row]]


def test_repetition_penalty_equals_generate_one_by_one_and_batch_equals_one_by_one(model, prompts):
    """transformers 5.x skips the penalty for the first (left padding length) new tokens of a padded
    ``inputs_embeds`` batch (it takes the padding for part of ``input_ids``); the core penalises every new
    token of every row, as the reference and as generate does for one unpadded row."""
    embeds, mask = prompts
    settings = DecodeSettings.from_kwargs({"repetition_penalty": 1.2}, 24, stops(model))
    batched = generate_ids(model.llm, embeds, mask, settings)
    for row in range(len(MESSAGES)):
        alone = single(embeds, mask, row)
        assert reference(model, *alone, 24, repetition_penalty=1.2) == [batched[row]]


@pytest.mark.parametrize("kwargs", [
    {"do_sample": True, "top_p": 0.8, "top_k": 100, "temperature": 0.7, "repetition_penalty": 1.05},
    {"do_sample": True, "top_k": 5, "temperature": 1.3, "min_new_tokens": 6},
    {"do_sample": True, "top_p": 0.5},
])
def test_sampling_with_a_seed_equals_generate(model, prompts, kwargs):
    embeds, mask = prompts
    alone = single(embeds, mask, 1)
    settings = DecodeSettings.from_kwargs(kwargs, 20, stops(model))
    torch.manual_seed(7)
    ours = generate_ids(model.llm, *alone, settings)
    torch.manual_seed(7)
    assert ours == reference(model, *alone, 20, **kwargs)
    generator = torch.Generator().manual_seed(11)
    first = generate_ids(model.llm, embeds, mask, settings, generator=generator)
    generator.manual_seed(11)
    assert generate_ids(model.llm, embeds, mask, settings, generator=generator) == first


def test_each_sampling_step_equals_its_transformers_processor():
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    scores = torch.randn(3, 50) * 3
    history = torch.tensor([[1, 4, 4], [0, 7, 9], [3, 3, 3]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
    assert torch.equal(sampling.penalise_repeats(scores, seen, 1.3),
                       lp.RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone()))
    assert torch.equal(sampling.top_k_filter(scores, 7), lp.TopKLogitsWarper(7)(history, scores))
    assert torch.equal(sampling.top_p_filter(scores, 0.6), lp.TopPLogitsWarper(0.6)(history, scores))
    banned = torch.zeros(50, dtype=torch.bool)
    banned[[2, 5]] = True
    ban = lp.MinNewTokensLengthLogitsProcessor(0, 4, torch.tensor([2, 5]))
    assert torch.equal(sampling.ban_ids(scores, banned), ban(history, scores))


def test_finished_rows_free_their_slot(model, prompts, monkeypatch):
    """A stop id that one row reaches early: that row's slot is freed at the first read-back (no
    reallocation), the others decode on with the same ids."""
    from minicpmo_cli.generation.kv_pool import KVPool

    embeds, mask = prompts
    settings = DecodeSettings.from_kwargs({}, 24, stops(model))
    plain = generate_ids(model.llm, embeds, mask, settings)
    for early_row, row in enumerate(plain):  # a row's first token acts as a stop id: it ends at once
        early = row[0]
        expected = [cut(ids, [early]) for ids in plain]
        if max(len(ids) for ids in expected) > decode.CHECK_EVERY:
            break
    settings = settings.with_(stop_ids=(early,))
    freed, grown = [], []
    real_free, real_grown = KVPool.free, KVPool.grown
    monkeypatch.setattr(KVPool, "free", lambda self, slot: freed.append(slot) or real_free(self, slot))
    monkeypatch.setattr(KVPool, "grown", lambda self, *a: grown.append(a) or real_grown(self, *a))
    assert generate_ids(model.llm, embeds, mask, settings) == expected
    assert len(expected[early_row]) == 1 and max(len(ids) for ids in expected) > decode.CHECK_EVERY
    assert freed and freed[0] == early_row  # the first slot freed is that row's
    assert not grown  # the pool was sized for the batch once; nothing was reallocated


def test_on_token_streams_every_id_and_can_stop(model, prompts):
    embeds, mask = prompts
    alone = single(embeds, mask, 0)
    settings = DecodeSettings.from_kwargs({}, 10, stops(model))
    seen = []
    ids = generate_ids(model.llm, *alone, settings, on_token=lambda step: seen.append(step[0]))
    assert seen == ids[0]
    stopped = generate_ids(model.llm, *alone, settings, on_token=lambda step: True)
    assert stopped == [ids[0][:1]]


def test_prefill_hidden_is_the_prompt_pass(model, prompts):
    embeds, mask = prompts
    alone = single(embeds, mask, 2)
    captured = []
    generate_ids(model.llm, *alone, DecodeSettings(max_new_tokens=1), on_prefill=captured.append)
    with torch.inference_mode():
        expected = model.llm.model(inputs_embeds=alone[0]).last_hidden_state
    assert torch.equal(captured[0], expected)


def test_settings_refuse_contradictions_and_bad_values():
    with pytest.raises(UsageError, match="sampling and num_beams=3"):
        DecodeSettings(sampling=True, num_beams=3)
    for bad in ({"top_p": 0.0}, {"temperature": 0.0}, {"max_new_tokens": 0}, {"top_k": -1}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            DecodeSettings(**bad)
    assert DecodeSettings.from_kwargs({"num_beams": 3, "repetition_penalty": 1.2}, 5, [1]).beam_search


def test_buckets_are_few():
    assert [bucket_length(n) for n in (1, 256, 257, 2048, 2049, 5000)] == [256, 256, 512, 2048, 4096, 8192]
    assert len({bucket_length(n) for n in range(1, 2049)}) == 8


def test_cli_refuses_sampling_with_beams_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "minicpmo_cli", "--model", str(tmp_path), "chat", "hi",
                             "--sampling", "--num-beams", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    # the library's words (sampling, num_beams) said as the CLI's flags (issue 15 item 5)
    assert len(lines) == 1 and "--sampling and --num-beams=4" in lines[0] and "Traceback" not in result.stderr
