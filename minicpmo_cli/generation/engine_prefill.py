"""The LLM engine's prompt side (generation/engine.py): a step's prompt chunks written into their slots (one
scripted call for them all in step mode ``trace``: generation/prefill_script.py; else ``forward.forward`` per
chunk), and the last logits of the prompts that are now all in."""

from __future__ import annotations

import torch

from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.scheduler import Row


class EnginePrefill:
    """Prefill of :class:`LLMEngine` (a part of it: the engine's scheduler, pool, ``llm``, ``prefill_chunk``,
    ``scripted_prefill`` and logits buffer)."""

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
        parts = []
        for row in rows:
            parts.append((row, row.prefilled, min(row.prompt_length, row.prefilled + self.prefill_chunk)))
        lasts = []
        for (row, begin, end), (hidden, last) in zip(parts, self._prefill_parts(parts)):
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
