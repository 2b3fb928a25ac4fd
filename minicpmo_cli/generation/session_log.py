"""What a streaming session's LLM cache holds, call by call, so that it can forget its oldest turns.

A long live conversation outgrows the LLM's positions. To go on, the session keeps the system prompt's
cache, drops the oldest turns and runs the LLM again over the turns it keeps, from the position right after
the system prompt. For that it needs each kept call's input: a prefill's input rows exactly as the LLM got
them (text, image and audio embeddings: the audio encoder is not run again, and its streaming state belongs
to the turn being spoken, which is always kept), an answer's token ids (the generation prompt and the tokens
that entered the cache). A replay puts the same rows at new positions, so the cache equals that of a
session that had prefilled the kept calls right after its system prompt.

A cut is made only where a user turn begins: the conversation then starts with a whole user turn. That
turn's first rows which closed the previous answer (``<|im_end|>\\n`` or ``<|tts_eos|><|im_end|>\\n``) are
left out when it follows the system prompt, as a session that never had the previous answer writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from minicpmo_cli.generation.forward import forward
from minicpmo_cli.generation.static_cache import StaticKV, bucket_length


@dataclass
class Entry:
    """One LLM call of the session: positions ``[start, end)``."""

    start: int
    end: int
    tag: Any = None  # the caller's label for what the call holds (a live conversation's item id)
    embeds: torch.Tensor | None = None  # a prefill: the input rows ``[1, n, hidden]``
    ids: list[int] = field(default_factory=list)  # an answer: ids that entered the cache, in order
    closer: int = 0  # leading rows that close the previous answer (0: none)
    turn_start: bool = False  # the first call of a user turn: a place to cut

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class SessionLog:
    """The calls after the system prompt (which ends at ``system_end``), oldest first."""

    system_end: int = 0
    entries: list[Entry] = field(default_factory=list)

    def record_prefill(self, start: int, embeds: torch.Tensor, tag: Any, closer: int, turn_start: bool) -> None:
        self.entries.append(Entry(start, start + int(embeds.shape[1]), tag, embeds.detach(), [], closer,
                                  turn_start))

    def start_answer(self, start: int, tag: Any) -> None:
        self.entries.append(Entry(start, start, tag))

    def extend_answer(self, ids: list[int]) -> None:
        entry = self.entries[-1]
        entry.ids.extend(ids)
        entry.end += len(ids)

    def crop(self, length: int) -> None:
        """The cache was cut back to ``length``: forget what lay past it (an answer's tail)."""
        while self.entries and self.entries[-1].start >= length:
            self.entries.pop()
        if self.entries and self.entries[-1].end > length:
            entry = self.entries[-1]
            keep = length - entry.start
            if entry.embeds is not None:
                entry.embeds = entry.embeds[:, :keep]
            entry.ids = entry.ids[:keep]
            entry.end = length

    def kept_size(self, index: int) -> int:
        """Positions the conversation holds if it starts at entry ``index`` (its closing rows dropped)."""
        if index >= len(self.entries):
            return 0
        return self.entries[-1].end - self.entries[index].start - self.entries[index].closer

    def cut_points(self) -> list[int]:
        """Entry indexes where a user turn begins."""
        return [i for i, entry in enumerate(self.entries) if entry.turn_start]


def closer_rows(prefix: str, tokenizer) -> int:
    """Tokens of a turn prefix before its ``<|im_start|>``: what closes the previous answer."""
    closer = prefix[:prefix.rfind("<|im_start|>")]
    return len(tokenizer(closer, add_special_tokens=False)["input_ids"]) if closer else 0


# ---------------------------------------------------------------------------------------------- LLM calls
def llm_step(model, embeds: torch.Tensor, cache: StaticKV | None):
    """Run the LLM over new positions appended to ``cache``; returns (final-norm hidden, cache).

    Positions continue after the cache, the mask is causal over cache + new (the reference passes an
    all-ones mask and ``position_ids=None``, which means the same for batch 1).
    """
    count = embeds.shape[1]
    if cache is None:
        cache = StaticKV.empty(model.llm.config, 1, bucket_length(count), embeds.dtype, embeds.device)
    start = cache.length
    cache.ensure_capacity(start + count)
    positions = torch.arange(start, start + count, device=embeds.device).unsqueeze(0)
    mask = None
    if start and count > 1:  # as transformers: a bool causal mask over cache + new positions
        keys = torch.arange(start + count, device=embeds.device)
        mask = (keys[None, :] <= positions[0, :, None])[None, None]
    return forward(model.llm, embeds, positions, cache, mask), cache


@torch.inference_mode()
def append_ids(model, cache: StaticKV, ids: list[int], log: SessionLog | None, tag: Any) -> StaticKV:
    """An answer's ids appended in one LLM call (logged as an answer)."""
    start = cache.length
    feed = torch.tensor([ids], dtype=torch.long, device=model.device)
    _, cache = llm_step(model, model.llm.model.embed_tokens(feed), cache)
    if log is not None:
        log.start_answer(start, tag)
        log.extend_answer(ids)
    return cache


@torch.inference_mode()
def replay(model, log: SessionLog, cache: StaticKV, first_kept: int) -> tuple[list, StaticKV]:
    """Forget ``log``'s entries before ``first_kept`` and rebuild ``cache`` from the system prompt's end
    with the rest, one LLM call per entry as they were first made; returns (forgotten tags, cache)."""
    dropped, kept = log.entries[:first_kept], log.entries[first_kept:]
    if kept and not kept[0].turn_start:
        raise ValueError("a session's log is cut only where a user turn begins")
    cache.length = log.system_end
    log.entries = []
    for index, entry in enumerate(kept):
        if entry.embeds is None:
            cache = append_ids(model, cache, entry.ids, log, entry.tag)
            continue
        closer = entry.closer if index == 0 else 0  # the turn now follows the system prompt
        rows = entry.embeds[:, closer:]
        start = cache.length
        _, cache = llm_step(model, rows, cache)
        log.record_prefill(start, rows, entry.tag, entry.closer - closer, entry.turn_start)
    return [entry.tag for entry in dropped], cache


# ---------------------------------------------------------------------------------------------- on a session
def forget(session, first_kept: int) -> list:
    """Forget the oldest entries of ``session`` (an OmniSession made with ``keep_log=True``) up to
    ``first_kept`` (a user turn's start, or len(entries): all of them) and rebuild its cache from the rest;
    returns the forgotten entries' tags. The streaming audio state is untouched: it belongs to the turn
    being spoken, which is always kept."""
    if session.log is None or session.llm_cache is None:
        raise ValueError("forget() needs a prefilled session that keeps its log (keep_log=True)")
    dropped, session.llm_cache = replay(session.model, session.log, session.llm_cache, first_kept)
    return dropped


def append_answer(session, ids: list[int], completed: bool = True, tag: Any = None) -> None:
    """Append an answer's cached ids (generation prompt + tokens) to ``session`` in one LLM call, as a
    replay writes it; the next user turn closes it as after ``generate`` (``completed``: it ended itself)."""
    if session.llm_cache is None:
        raise ValueError("append_answer() needs a prefilled session")
    session.llm_cache = append_ids(session.model, session.llm_cache, list(ids), session.log, tag)
    session.new_user_msg, session.llm_generated, session.llm_generate_completed = True, True, bool(completed)
    session.audio_cache = None


def crop(session, length: int) -> None:
    """Cut ``session``'s cache back to ``length`` positions (an answer stopped early: its unheard tail)."""
    session.llm_cache.length = min(session.llm_cache.length, int(length))
    if session.log is not None:
        session.log.crop(session.llm_cache.length)
