"""The LLM engine's prompt side (generation/engine.py): a step's prompt chunks written into their slots (one
scripted call for them all in step mode ``trace``: generation/prefill_script.py; else ``forward.forward`` per
chunk), and the last logits of the prompts that are now all in.

A threaded CPU engine in step mode ``trace`` makes a short prompt's pass on the thread that submits it (a
server's request thread), into KV buffers of its own, which the engine thread copies into the slot it
admits the request to: the engine thread is the one every running row waits on, and the pass (~1 ms for a
51-token chat prompt on the tiny checkpoint, a tenth of what a request costs it in a busy server) runs on
another core beside its steps. The pass is the same scripted call on the same values, so the slot holds the
same keys and values and the first id is the same (tested)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.kv_pool import KVPool
from minicpmo_cli.generation.requests import Request
from minicpmo_cli.generation.scheduler import Row

EARLY_MAX_POSITIONS = 512  # longer prompts are prefilled by the engine thread (in chunks, between steps)


@dataclass
class EarlyPrefill:
    """A whole prompt's pass made before admission: its keys/values ``[1, KVH, n, D]`` per layer, its final
    norm's hidden states ``[1, n, D]`` and its last position's float32 logits ``[1, V]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor
    last: torch.Tensor


class EnginePrefill:
    """Prefill of :class:`LLMEngine` (a part of it: the engine's scheduler, pool, ``llm``, ``prefill_chunk``,
    ``scripted_prefill``, ``threaded``, ``threads``, ``max_batch``, lock and logits buffer)."""

    def _prefill_early(self, request: Request) -> EarlyPrefill | None:
        """On the submitting thread: the prompt's whole pass into buffers of its own (see the module
        docstring), or None where the engine thread prefills it (not a threaded CPU engine with the scripted
        pass, a long prompt, or ``max_batch`` such passes already waiting: what they hold stays within a
        batch's worth of short prompts)."""
        embeds = request.embeds
        length = int(embeds.shape[0])
        if (self.scripted_prefill is None or not self.threaded or embeds.device.type != "cpu"
                or length > min(EARLY_MAX_POSITIONS, self.prefill_chunk)):
            return None
        with self._lock:
            if sum(handle.early is not None for handle in self.scheduler.waiting) >= self.max_batch:
                return None
        weight = self.llm.lm_head.weight
        own = KVPool.empty(self.llm.config, 1, length, weight.dtype, weight.device)
        if self.threads is not None and torch.get_num_threads() != self.threads:
            # the engine thread's intra-op threads (one for a small decoder: this pass took 2x longer on two),
            # kept for this thread from now on: torch's setting is partly process-wide, and putting two back
            # here made the engine thread's steps 2x slower
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            made = self.scripted_prefill.run([(embeds[None], 0, 0)], own.keys, own.values)
        if made is None:  # hooks on the LLM, or no scripted pass: the engine's eager pass runs it
            return None
        hidden, last = made[0]
        return EarlyPrefill(own.keys, own.values, hidden, last)

    def _place_early(self, row: Row, early: EarlyPrefill) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt prefilled on its submitting thread, copied into the row's slot: (hidden, last logits)."""
        pool, length = self.pool, row.prompt_length
        for buffers, own in ((pool.keys, early.keys), (pool.values, early.values)):
            for buffer, mine in zip(buffers, own):
                buffer[row.slot, :, :length].copy_(mine[0])
        pool.lengths[row.slot] = length
        row.handle.early = None
        return early.hidden, early.last

    def _prefill_step(self) -> list[tuple[Row, torch.Tensor]]:
        """This step's prompt chunks prefilled; the rows whose prompts are now all in, with their last logits."""
        prefilling = self.scheduler.prefilling()
        if not prefilling:
            return []
        return [(row, last) for row, last in zip(prefilling, self._prefill_chunks(prefilling)) if last is not None]

    def _prefilled_logits(self, logits: torch.Tensor | None, prefilled: list[tuple[Row, torch.Tensor]]):
        """Logits of slots ``[0, span)`` (``logits``, or the engine's buffer) with the prefilled rows' last
        logits in their slots' rows (one write for them all)."""
        if not prefilled:
            return logits
        logits = self._logits_rows(logits)
        slots = torch.tensor([row.slot for row, _ in prefilled], device=logits.device)
        logits.index_copy_(0, slots, torch.cat([last for _, last in prefilled]))
        return logits

    def _prefill_chunks(self, rows: list[Row]) -> list[torch.Tensor | None]:
        """Prefill the next chunk of each row's prompt into its slot; per row the float32 logits ``[1, V]`` of
        the prompt's last position once it is all in, else None."""
        parts, made = [], {}
        for row in rows:
            if row.handle.early is not None:
                made[row.slot] = self._place_early(row, row.handle.early)
            else:
                parts.append((row, row.prefilled, min(row.prompt_length, row.prefilled + self.prefill_chunk)))
        ends = {row.slot: row.prompt_length for row in rows}
        if parts:
            for (row, _, end), result in zip(parts, self._prefill_parts(parts)):
                made[row.slot], ends[row.slot] = result, end
        lasts = []
        for row in rows:
            (hidden, last), end = made[row.slot], ends[row.slot]
            row.prefilled = end
            if row.request.on_prefill is not None:
                row.hidden.append(hidden[0])
            if end < row.prompt_length:
                lasts.append(None)
                continue
            if row.request.on_prefill is not None:
                row.request.on_prefill(torch.cat(row.hidden) if len(row.hidden) > 1 else row.hidden[0])
                row.hidden = []
            lasts.append(last if last is not None else self.llm.lm_head(hidden[:, -1:]).float()[:, -1])
        return lasts

    def _prefill_parts(self, parts: list[tuple[Row, int, int]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Positions ``[begin, end)`` of each ``(row, begin, end)``'s prompt written straight into its slot:
        causal over the slot's past (a whole prompt: ``Qwen2Model.forward``'s arithmetic, no mask, as
        ``generate`` makes it; generation/forward.py). Per part the final norm's hidden states, and the last
        position's logits where the scripted pass made them (one call for all parts: generation/prefill_script.py,
        step mode ``trace``)."""
        pool = self.pool
        if self.scripted_prefill is not None:
            chunks = [(row.request.embeds[None, begin:end], row.slot, pool.lengths[row.slot])
                      for row, begin, end in parts]
            made = self.scripted_prefill.run(chunks, pool.keys, pool.values)
            if made is not None:
                for row, begin, end in parts:
                    pool.lengths[row.slot] += end - begin
                return made
        made = []
        for row, begin, end in parts:
            embeds = row.request.embeds[None, begin:end]
            device = embeds.device
            positions = torch.arange(begin, end, device=device)[None]
            mask = None
            if begin > 0:
                keys = torch.arange(end, device=device)
                mask = (keys[None, :] <= positions[0, :, None])[None, None]
            view = pool.slot_view(row.slot)
            made.append((fwd.forward(self.llm, embeds, positions, view, mask), None))
            pool.sync_view(row.slot, view)
        return made

    def _logits_rows(self, logits: torch.Tensor | None) -> torch.Tensor:
        """Logits of slots ``[0, span)`` (a prefilled row's last logits are put in its slot's row)."""
        span = self.pool.span()
        if logits is None:
            return self._logits[:span]
        if logits.shape[0] < span:
            grown = self._logits[:span]
            grown[: logits.shape[0]] = logits
            return grown
        return logits
