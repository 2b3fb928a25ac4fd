"""`minicpmo serve --kv-cache-gb` without --max-batch: the batch follows the budget (pool threads, /metrics), a
request whose KV positions cannot fit the budget gets a 400 before anything is decoded, and others are answered."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import API_KEY, MODEL, metrics, start_server, stop_server

# The tiny LLM: 2 layers x 2 key/value heads x 32 x float32 = 1 KiB per position; 0.0005 GiB holds 524 positions,
# less than one slot of the default 4096 (the tiny context): a batch of 1, requests of up to 512 positions.
BUDGET_GB = 0.0005


@pytest.fixture(scope="module")
def budget_server(tiny_ckpt, tmp_path_factory):
    running = start_server(tiny_ckpt, tmp_path_factory.mktemp("budget-server"), "--served-model-name", MODEL,
                           "--api-key", API_KEY, "--kv-cache-gb", str(BUDGET_GB), "--no-tts")
    yield running
    stop_server(running)


def test_the_batch_and_the_refusals_follow_the_kv_budget(budget_server):
    client = budget_server.client()
    messages = [{"role": "user", "content": "Hello."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert answer.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1000, temperature=0)
    assert "KV cache" in str(refused.value) and refused.value.status_code == 400
    values = metrics(budget_server)
    assert values["minicpmo:kv_cache_budget_bytes"] == int(BUDGET_GB * (1 << 30))
    assert 0 < values["minicpmo:kv_cache_bytes"] <= values["minicpmo:kv_cache_budget_bytes"]
    assert values["minicpmo:num_pool_threads"] == 1
