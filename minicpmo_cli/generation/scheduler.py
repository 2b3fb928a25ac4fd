"""The LLM engine's bookkeeping of requests (generation/engine.py): waiting -> running (a :class:`Row` in a KV
slot) -> finished."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from minicpmo_cli.generation.requests import EngineFull, Handle, Request

MAX_WAITING = 1024


@dataclass
class Row:
    """A running request: its slot, how far its prompt is prefilled, tokens chosen (read back or not)."""

    handle: Handle
    slot: int
    prefilled: int = 0
    sampled: int = 0  # ids chosen on the device so far (read back or not)
    hidden: list = field(default_factory=list)
    generator: torch.Generator | None = None
    decoding: bool = False  # has a chosen id to feed at the next step
    unsent: list = field(default_factory=list)  # ids read back, not yet handed to the reader
    delivered_at: float | None = None  # when ids were last handed to the reader (monotonic seconds)

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def prompt_length(self) -> int:
        return self.request.embeds.shape[0]

    @property
    def streams(self) -> bool:
        return self.request.stream or self.request.on_tokens is not None


class Scheduler:
    """Waiting -> running -> finished: admits waiting requests into free slots (first come, first served)."""

    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self.waiting: deque[Handle] = deque()
        self.running: dict[int, Row] = {}
        self.max_waiting = max_waiting

    def add(self, handle: Handle) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise EngineFull(f"the engine's queue is full ({self.max_waiting} requests waiting); retry later")
        self.waiting.append(handle)

    def prefilling(self) -> list[Row]:
        return [row for row in self.running.values() if row.prefilled < row.prompt_length]

    def decoding(self) -> list[Row]:
        return [row for row in self.running.values() if row.decoding]
