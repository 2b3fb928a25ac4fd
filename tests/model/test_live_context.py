"""A live conversation that outgrows the LLM's positions (api/live_model.py, generation/session_log.py) on a tiny
checkpoint with a 320-position LLM: forgetting the oldest turns rebuilds exactly the cache a fresh session fed
the kept turns has (same keys and values, same next answer), the cache never passes the context, and with
truncation disabled (or a turn too long for the context) the input is refused and nothing changes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from minicpmo_cli.api.live_model import ContextFull, LiveModel
from minicpmo_cli.api.live_session_config import Truncation
from tests.server.small_context import CONTEXT, small_context_checkpoint

ANSWER_TOKENS = 20


@pytest.fixture(scope="module")
def engine(tiny_ckpt, tmp_path_factory):
    from minicpmo_cli import api

    ckpt = small_context_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("small-context"))
    return api.load(api.LoadOptions(model=str(ckpt), device="cpu"))


@pytest.fixture(scope="module")
def decode():
    from minicpmo_cli.generation.presets import DecodeOptions, resolve

    return resolve("omni-stream", DecodeOptions(max_new_tokens=ANSWER_TOKENS, sampling=False)).decode


def units(seed: int, count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.2, 0.2, 16000).astype(np.float32) for _ in range(count)]


def answer(model: LiveModel, engine, decode, item_id: str, cancel_after: int | None = None):
    cancel, texts = threading.Event(), []

    def emit(text, audio) -> None:
        texts.append(text)
        if cancel_after is not None and len(texts) >= cancel_after:
            cancel.set()

    return model.answer(engine, cancel, emit, decode=decode, seed=1, speak=False, item_id=item_id)


def same_cache(a, b) -> bool:
    return a.length == b.length and all(torch.equal(x[:, :, :a.length], y[:, :, :b.length])
                                        for x, y in zip(a.keys + a.values, b.keys + b.values))


def same_cache_prefix(a, b, length: int) -> bool:
    return all(torch.equal(x[:, :, :length], y[:, :, :length]) for x, y in zip(a.keys + a.values, b.keys + b.values))


def test_forgetting_rebuilds_the_cache_of_a_fresh_session_fed_the_kept_turns(engine, decode):
    forgetting_scenario(engine, decode)


def test_forgetting_on_cuda_rebuilds_the_cache_of_a_fresh_session(tiny_ckpt, tmp_path, decode):
    """The same on the GPU (bf16 on CUDA, in the GPU run's tests): the rebuild repeats the calls exactly."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from minicpmo_cli import api

    ckpt = small_context_checkpoint(tiny_ckpt, tmp_path)
    forgetting_scenario(api.load(api.LoadOptions(model=str(ckpt), device="cuda")), decode)


def forgetting_scenario(engine, decode) -> None:
    model = LiveModel(answer_tokens=ANSWER_TOKENS)
    turns = {f"u{index}": units(index) for index in range(4)}
    answers, lengths, dropped = {}, [], []
    for index in range(3):
        for unit in turns[f"u{index}"]:
            model.prefill_unit(engine, unit, item_id=f"u{index}")
            lengths.append(model.length())
        stats = answer(model, engine, decode, f"a{index}")
        lengths.append(model.length())
        dropped += stats.dropped_item_ids
        answers[f"a{index}"] = (list(model.session.log.entries[-1].ids), model.session.llm_generate_completed)
    assert dropped == ["u0", "a0"]  # the third turn did not fit: the first one (its input and answer) went
    assert max(lengths) <= CONTEXT and stats.context_limit == CONTEXT
    log = model.session.log  # what is kept for a rebuild is what the cache holds, no more
    assert sum(entry.size for entry in log.entries) == model.length() - log.system_end
    kept = list(dict.fromkeys(entry.tag for entry in model.session.log.entries))
    assert kept == ["u1", "a1", "u2", "a2"]

    fresh = LiveModel(answer_tokens=ANSWER_TOKENS)  # the kept turns fed right after the system prompt
    for unit in turns["u1"]:
        fresh.prefill_unit(engine, unit, item_id="u1")
    fresh.prefill_answer(engine, *answers["a1"], item_id="a1")
    for unit in turns["u2"]:
        fresh.prefill_unit(engine, unit, item_id="u2")
    before = model.session.llm_cache.length
    crop_to = before - len(answers["a2"][0])  # the same point in the original: before its last answer
    assert same_cache_prefix(model.session.llm_cache, fresh.session.llm_cache, crop_to)
    fresh_answer = answer(fresh, engine, decode, "a2")
    assert fresh_answer.context_tokens == before
    assert fresh.session.log.entries[-1].ids == answers["a2"][0]  # the same answer ids
    assert same_cache(model.session.llm_cache, fresh.session.llm_cache)

    # the next turn goes on in both the same way (the forgetting one forgets again when it must)
    for unit in turns["u3"]:
        model.prefill_unit(engine, unit, item_id="u3")
        fresh.prefill_unit(engine, unit, item_id="u3")
        assert model.length() <= CONTEXT
    assert answer(model, engine, decode, "a3").text == answer(fresh, engine, decode, "a3").text


def test_a_stopped_answer_is_cropped_in_the_log_too(engine, decode):
    model = LiveModel(answer_tokens=ANSWER_TOKENS)
    for index in range(3):
        for unit in units(10 + index):
            model.prefill_unit(engine, unit, item_id=f"u{index}")
        stats = answer(model, engine, decode, f"a{index}", cancel_after=2)
        assert stats.cancelled and stats.cropped_to == model.length()
        log = model.session.log
        assert log.entries[-1].end == model.length() and len(log.entries[-1].ids) == log.entries[-1].size
    assert stats.dropped_item_ids == ["u0", "a0"] and model.length() <= CONTEXT


def test_disabled_truncation_refuses_the_input_and_the_answer(engine, decode):
    model = LiveModel(answer_tokens=ANSWER_TOKENS, truncation=Truncation(kind="disabled"))
    for index in range(2):
        for unit in units(20 + index):
            model.prefill_unit(engine, unit, item_id=f"u{index}")
        answer(model, engine, decode, f"a{index}")
    full = model.length()
    with pytest.raises(ContextFull, match="disabled"):
        model.prefill_unit(engine, units(30, 1)[0], item_id="u2")
    assert model.length() == full and model.session.new_user_msg  # nothing of the refused turn was read
    assert model.prefill_unit(engine, units(31, 1)[0], item_id="u2") == 0.0  # the rest of the turn is skipped
    with pytest.raises(ContextFull):
        answer(model, engine, decode, "a2")
    model.truncation = Truncation()  # turned on again: the next turn forgets the oldest and goes on
    model.prefill_unit(engine, units(32, 1)[0], item_id="u3")
    assert answer(model, engine, decode, "a3").dropped_item_ids == ["u0", "a0"]


def test_a_turn_longer_than_the_context_is_refused_even_with_auto(engine, decode):
    model = LiveModel(answer_tokens=ANSWER_TOKENS)
    with pytest.raises(ContextFull, match="this turn alone"):
        for unit in units(40, 12):
            model.prefill_unit(engine, unit, item_id="u0")
    assert model.length() <= CONTEXT


def test_deleting_items_rebuilds_the_cache_without_them(engine, decode):
    model = LiveModel(answer_tokens=ANSWER_TOKENS, truncation=Truncation(kind="disabled"))
    answers = {}
    for index in range(2):
        for unit in units(50 + index, 2):
            model.prefill_unit(engine, unit, item_id=f"u{index}")
        answer(model, engine, decode, f"a{index}")
        answers[f"a{index}"] = (list(model.session.log.entries[-1].ids), model.session.llm_generate_completed)
    for unit in units(52, 1):
        model.prefill_unit(engine, unit, item_id="u2")  # a turn in progress: its audio state stays
    assert model.delete_item(engine, "u0") and model.delete_item(engine, "a0")
    assert not model.delete_item(engine, "a0")
    assert [entry.tag for entry in model.session.log.entries] == ["u1"] * 2 + ["a1", "u2"]

    fresh = LiveModel(answer_tokens=ANSWER_TOKENS)
    for unit in units(51, 2):
        fresh.prefill_unit(engine, unit, item_id="u1")
    fresh.prefill_answer(engine, *answers["a1"], item_id="a1")
    for unit in units(52, 1):
        fresh.prefill_unit(engine, unit, item_id="u2")
    assert same_cache(model.session.llm_cache, fresh.session.llm_cache)
    second = units(52, 2)[1]  # the turn goes on: the same audio context in both
    model.prefill_unit(engine, second, item_id="u2")
    fresh.prefill_unit(engine, second, item_id="u2")
    assert answer(model, engine, decode, "a2").text == answer(fresh, engine, decode, "a2").text
    assert same_cache(model.session.llm_cache, fresh.session.llm_cache)


def test_token_limits_lower_the_limit_and_a_ratio_of_one_forgets_only_what_it_must(engine, decode):
    truncation = Truncation(kind="retention_ratio", retention_ratio=1.0, post_instructions=150)
    model = LiveModel(answer_tokens=ANSWER_TOKENS, truncation=truncation)
    dropped, after_system = [], []
    for index in range(3):
        for unit in units(60 + index):
            model.prefill_unit(engine, unit, item_id=f"u{index}")
            after_system.append(model.length() - model.session.log.system_end)
        dropped.append(answer(model, engine, decode, f"a{index}").dropped_item_ids)
    assert dropped == [[], ["u0", "a0"], ["u1", "a1"]]  # each turn alone is 91 + 28: two never fit in 150
    assert max(after_system) <= 150
