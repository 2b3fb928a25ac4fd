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
    # fixed for the row's life, read every step (plain attributes: properties cost a call per row per step)
    request: Request = field(init=False)
    prompt_length: int = field(init=False)
    streams: bool = field(init=False)
    greedy_from: float = field(init=False)  # tokens after which its choice may run in a traced step (inf: never)

    def __post_init__(self) -> None:
        self.request = request = self.handle.request
        self.prompt_length = int(request.embeds.shape[0])
        self.streams = request.stream or request.on_tokens is not None
        settings = request.settings
        self.greedy_from = float("inf") if settings.sampling else settings.min_new_tokens


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
