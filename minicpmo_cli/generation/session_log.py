"""What a streaming session's LLM cache holds, call by call, so that it can forget its oldest turns.

A long live conversation outgrows the LLM's positions. To go on, the session keeps the system prompt's
cache, drops the oldest turns and runs the LLM again over the turns it keeps, from the position right after
the system prompt. For that it needs each kept call's input: a prefill's input rows exactly as the LLM got
them (text, image and audio embeddings: the audio encoder is not run again, and its streaming state belongs
to the turn being spoken, which is always kept), an answer's token ids (the generation prompt and the tokens
that entered the cache). A replay puts the same rows at new positions, so the cache equals that of a
session that had prefilled the kept calls right after its system prompt.

Forgetting cuts only where a user turn begins: the conversation then starts with a whole user turn. Deleting
one item (every call tagged with it) rebuilds from its first call on. A call's first rows that close what came
before it (a user turn's ``<|im_end|>\\n`` or ``<|tts_eos|><|im_end|>\\n`` after an answer, an answer's
``<|im_end|>\\n`` after the user's turn) are left out when it comes to follow the system prompt, whose turn is
closed already: as a session that never had the forgotten calls writes it.
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
    closer: int = 0  # leading rows that close what came before (0: none)
    turn_start: bool = False  # the first call of a user turn: a place to cut
    completed: bool = False  # an answer that ended itself (not cut short)

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

    def start_answer(self, start: int, tag: Any, closer: int) -> None:
        self.entries.append(Entry(start, start, tag, closer=closer))

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
def append_ids(model, cache: StaticKV, ids: list[int], log: SessionLog | None, tag: Any, closer: int,
               completed: bool) -> StaticKV:
    """An answer's ids appended in one LLM call (logged as an answer)."""
    start = cache.length
    feed = torch.tensor([ids], dtype=torch.long, device=model.device)
    _, cache = llm_step(model, model.llm.model.embed_tokens(feed), cache)
    if log is not None:
        log.start_answer(start, tag, closer)
        log.extend_answer(ids)
        log.entries[-1].completed = completed
    return cache


@torch.inference_mode()
def rebuild(model, log: SessionLog, cache: StaticKV, head: int, tail: list[Entry]) -> StaticKV:
    """Keep the cache of ``log.entries[:head]``; write ``tail``'s calls after it, one LLM call each as they
    were first made (a call that comes to follow the system prompt without its closing rows)."""
    cache.length = log.entries[head - 1].end if head else log.system_end
    log.entries = log.entries[:head]
    for entry in tail:
        closer = entry.closer if cache.length == log.system_end else 0
        start = cache.length
        if entry.embeds is None:
            cache = append_ids(model, cache, entry.ids[closer:], log, entry.tag, entry.closer - closer,
                               entry.completed)
            continue
        rows = entry.embeds[:, closer:]
        _, cache = llm_step(model, rows, cache)
        log.record_prefill(start, rows, entry.tag, entry.closer - closer, entry.turn_start)
    return cache


# ---------------------------------------------------------------------------------------------- on a session
def forget(session, first_kept: int) -> list:
    """Forget the oldest entries of ``session`` (an OmniSession made with ``keep_log=True``) up to
    ``first_kept`` (a user turn's start, or len(entries): all of them) and rebuild its cache from the rest;
    returns the forgotten entries' tags. The streaming audio state is untouched: it belongs to the turn
    being spoken, which is always kept."""
    log = _log_of(session)
    dropped, kept = log.entries[:first_kept], log.entries[first_kept:]
    if kept and not kept[0].turn_start:
        raise ValueError("a session's log is cut only where a user turn begins")
    session.llm_cache = rebuild(session.model, log, session.llm_cache, 0, kept)
    if not kept:
        session.new_user_msg = True
    return [entry.tag for entry in dropped]


def delete(session, tag: Any) -> bool:
    """Take every call tagged ``tag`` out of ``session``'s cache (rebuilt from the first of them on); the
    turn state then follows what is last. Returns whether there was any."""
    log = _log_of(session)
    first = next((i for i, entry in enumerate(log.entries) if entry.tag == tag), None)
    if first is None:
        return False
    was_last = log.entries[-1].tag == tag
    tail = [entry for entry in log.entries[first:] if entry.tag != tag]
    session.llm_cache = rebuild(session.model, log, session.llm_cache, first, tail)
    last = log.entries[-1] if log.entries else None
    session.new_user_msg = last is None or last.embeds is None
    if last is None:
        session.llm_generated = False
    elif last.embeds is None:
        session.llm_generated, session.llm_generate_completed = True, last.completed
    if was_last:
        session.audio_cache = None  # the streaming audio state was the deleted turn's
    return True


def append_answer(session, ids: list[int], completed: bool, tag: Any, closer: int) -> None:
    """Append an answer's cached ids (generation prompt + tokens) to ``session`` in one LLM call, as a
    replay writes it (``closer``: its leading ids that close the user turn); the next user turn closes it
    as after ``generate`` (``completed``: it ended itself)."""
    log = _log_of(session)
    if closer and not log.entries and session.llm_cache.length == log.system_end:
        ids, closer = ids[closer:], 0  # right after the system prompt, whose turn is closed already
    session.llm_cache = append_ids(session.model, session.llm_cache, list(ids), session.log, tag, closer,
                                   completed)
    session.new_user_msg, session.llm_generated, session.llm_generate_completed = True, True, bool(completed)
    session.audio_cache = None


def crop(session, length: int) -> None:
    """Cut ``session``'s cache back to ``length`` positions (an answer stopped early: its unheard tail);
    the next user turn closes the answer as one cut short (``<|tts_eos|>`` first)."""
    session.llm_cache.length = min(session.llm_cache.length, int(length))
    session.llm_generate_completed = False
    if session.log is not None:
        session.log.crop(session.llm_cache.length)
        if session.log.entries and session.log.entries[-1].embeds is None:
            session.log.entries[-1].completed = False


def _log_of(session) -> SessionLog:
    if session.log is None or session.llm_cache is None:
        raise ValueError("a prefilled session that keeps its log (keep_log=True) is needed")
    return session.log
