"""The LLM engine thread's intra-op threads (api/engine.py engine_threads): one for a small decoder on the CPU,
torch's default for a wide one or on CUDA; the engine thread takes its own setting (OpenMP's is per thread)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from minicpmo_cli.api.engine import engine_threads


def llm_of_width(hidden: int):
    return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))


def test_one_thread_for_a_small_decoder_on_the_cpu_only():
    assert engine_threads(llm_of_width(128), "cpu") == 1
    assert engine_threads(llm_of_width(3584), "cpu") is None  # the full-size model's matrices pay for threads
    assert engine_threads(llm_of_width(128), "cuda:0") is None


def test_a_thread_setting_stays_in_its_thread():
    before = torch.get_num_threads()
    seen = []

    def engine_like():
        torch.set_num_threads(1)
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=engine_like)
    worker.start()
    worker.join()
    assert seen == [1] and torch.get_num_threads() == before
