"""How to choose tokens: :class:`DecodeSettings`, fully resolved and validated (no torch: the CLI checks a
user's options with it before anything heavy is imported; generation/presets.py builds it per task)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from minicpmo_cli.errors import UsageError

PAD_ID = 0  # what transformers' generate writes after a row's stop token (pad_token_id=0, as the reference)
TRANSFORMERS_TOP_K = 50  # what generate(do_sample=True) uses when top_k is not given


@dataclass(frozen=True)
class DecodeSettings:
    """How to choose tokens. ``sampling=False`` with ``num_beams == 1`` is greedy; ``num_beams > 1`` is beam
    search (only transformers ``generate`` does it). Values are the resolved ones, never None."""

    sampling: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 2048
    stop_ids: tuple[int, ...] = ()
    num_beams: int = 1

    def __post_init__(self) -> None:
        checks = (
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, not {self.max_new_tokens}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, not {self.min_new_tokens}"),
            (self.num_beams >= 1, f"num_beams must be at least 1, not {self.num_beams}"),
            (self.top_k >= 0, f"top_k must be >= 0, not {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p}"),
            (self.temperature > 0 and math.isfinite(self.temperature),
             f"temperature must be a positive number, not {self.temperature}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, not {self.repetition_penalty}"),
            (not (self.sampling and self.num_beams > 1),
             f"sampling and num_beams={self.num_beams} contradict each other: beam search does not sample "
             "(use sampling=False with num_beams, or sampling without num_beams)"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    @classmethod
    def from_kwargs(cls, kwargs: dict, max_new_tokens: int, stop_ids: Sequence[int]) -> DecodeSettings:
        """From transformers-style generate kwargs (``do_sample``, ``top_p``, ... as generation/text.py's
        ``decoding_settings`` resolves them). Unset values mean transformers' defaults (no filtering)."""
        def pick(name, default):
            value = kwargs.get(name)
            return default if value is None else value

        return cls(
            sampling=bool(kwargs.get("do_sample", False)), temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", TRANSFORMERS_TOP_K)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            min_new_tokens=int(pick("min_new_tokens", 0)), max_new_tokens=int(max_new_tokens),
            stop_ids=tuple(int(i) for i in stop_ids), num_beams=int(pick("num_beams", 1)),
        )

    def generate_kwargs(self) -> dict:
        """The same settings as keyword arguments of transformers ``generate``."""
        kwargs = {"do_sample": self.sampling, "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                  "repetition_penalty": self.repetition_penalty, "eos_token_id": list(self.stop_ids),
                  "pad_token_id": PAD_ID}
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        return kwargs

    def with_(self, **changes) -> DecodeSettings:
        return replace(self, **changes)


def cut_at_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    """``row`` up to and including its first stop id (what follows is padding), or all of it."""
    for index, token in enumerate(row):
        if token in stop_ids:
            return row[: index + 1]
    return row
