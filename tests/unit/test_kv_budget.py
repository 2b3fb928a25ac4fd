"""The KV cache budget (generation/kv_budget.py) as pure arithmetic: the batch a budget allows, the default
budget from free GPU memory, what one slot needs; with MiniCPM-o 2.6's full-size LLM (Qwen2.5-7B: 28 layers,
4 key/value heads of 128, bfloat16) and given numbers of free bytes, so it runs without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from minicpmo_cli.generation import kv_budget
from minicpmo_cli.generation.requests import ContextTooLong

GIB = kv_budget.GIB
FULL = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=4, hidden_size=3584, num_attention_heads=28,
                       max_position_embeddings=32768)
BF16 = 2


def test_one_position_of_the_full_size_model_is_56_kib():
    assert kv_budget.position_bytes(FULL, BF16) == 2 * 28 * 4 * 128 * 2 == 56 * 1024


@pytest.mark.parametrize("free_gib, batch", [
    (120, 128),  # an H200 after loading (~141 GB, ~16 GB of weights): 96 GiB hold 219 slots of 8192
    (60, 64),    # an 80 GB card
    (7, 8),      # a 24 GB card: 5.6 GiB hold 12 slots
    (0.5, 1),    # too little for one full slot still gives one (shorter requests fit)
    (10_000, 256),  # at most vLLM's 256
])
def test_the_batch_follows_the_free_memory(free_gib, batch):
    budget = kv_budget.budget_from_free(int(free_gib * GIB))
    assert budget == int(int(free_gib * GIB) * 0.8)
    plan = kv_budget.plan(FULL, BF16, budget, FULL.max_position_embeddings)
    assert plan.max_batch == batch and plan.capacity == 8192 and plan.budget_bytes == budget
    if free_gib >= 1:
        assert plan.max_batch * plan.capacity * plan.position_bytes <= budget


def test_a_short_context_sizes_slots_to_the_context():
    plan = kv_budget.plan(FULL, BF16, 8 * GIB, context=4096)
    assert plan.capacity == 4096 and plan.max_batch == 32  # 8 GiB / (4096 x 56 KiB) = 36.6 -> 32


def test_slots_within_a_budget_are_a_power_of_two_and_leave_the_reserve():
    per = kv_budget.position_bytes(FULL, BF16)
    assert kv_budget.slots_within(None, per, 16, 8192) == 16
    assert kv_budget.slots_within(10 * GIB, per, 64, 8192) == 16  # 22.8 fit
    assert kv_budget.slots_within(10 * GIB, per, 64, 8192, reserve=6 * GIB) == 8  # 9.1 fit beside the old pool
    assert kv_budget.slots_within(GIB // 4, per, 4, 8192) == 0


def test_a_request_whose_positions_alone_are_over_the_budget_is_refused():
    per = kv_budget.position_bytes(FULL, BF16)
    kv_budget.check_fits(None, per, 30000, 2000)
    kv_budget.check_fits(GIB, per, 10000, 2000)  # 16384 positions x 56 KiB = 0.875 GiB
    with pytest.raises(ContextTooLong, match=r"needs 1\.75 GiB of KV cache, more than its budget of 1\.00 GiB"):
        kv_budget.check_fits(GIB, per, 30000, 2000)
