"""Next-token choice on the device, in the order and arithmetic of transformers' ``generate``.

Order (transformers ``_get_logits_processor``): repetition penalty, the ``min_new_tokens`` stop ban, then,
when sampling, temperature, top-k, top-p, softmax and one ``torch.multinomial`` draw per row. Each step below
is the same tensor arithmetic as the transformers processor it replaces, so with the same logits and the same
RNG state the ids are the same. Nothing here reads a value back to the host: no ``.item()``, no shape that
depends on data, so a decode step that ends here can be captured by torch.compile / CUDA graphs.

The repetition penalty keeps a ``[B, V]`` boolean "seen" table instead of a growing id list: transformers
gathers the scores of the ids seen so far, multiplies (negative) or divides (positive) each once and scatters
them back, which is exactly ``where(seen, penalised, scores)``.
"""

from __future__ import annotations

import torch

from minicpmo_cli.generation.settings import PAD_ID


def penalise_repeats(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers ``RepetitionPenaltyLogitsProcessor`` over the ids marked in ``seen`` ``[B, V]``."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def ban_ids(scores: torch.Tensor, banned: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """``banned`` ``[V]`` bool set to -inf (``MinNewTokensLengthLogitsProcessor``); ``active``: a 0-d bool
    tensor saying whether the ban applies at this step (kept on the device, no host branch)."""
    mask = banned if active is None else banned & active
    return torch.where(mask, -float("inf"), scores)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """transformers ``TopKLogitsWarper`` (min_tokens_to_keep 1)."""
    top_k = min(max(int(top_k), 1), scores.size(-1))
    threshold = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < threshold, -float("inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers ``TopPLogitsWarper`` (min_tokens_to_keep 1)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


def next_tokens(logits: torch.Tensor, settings, seen: torch.Tensor | None, banned: torch.Tensor | None,
                ban_active: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 logits ``[B, V]`` -> next ids ``[B]`` under ``settings`` (a ``DecodeSettings``)."""
    scores = logits
    if seen is not None and settings.repetition_penalty != 1.0:
        scores = penalise_repeats(scores, seen, float(settings.repetition_penalty))
    if banned is not None:
        scores = ban_ids(scores, banned, ban_active)
    if not settings.sampling:
        return torch.argmax(scores, dim=-1)
    if settings.temperature != 1.0:
        scores = scores / float(settings.temperature)
    if settings.top_k:
        scores = top_k_filter(scores, settings.top_k)
    if settings.top_p < 1.0:
        scores = top_p_filter(scores, float(settings.top_p))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def settle_choice(chosen: torch.Tensor, next_ids: torch.Tensor, live: torch.Tensor, done: torch.Tensor,
                  stops: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """What the engine keeps of a step's choice ``chosen`` ``[B]``: pads for rows that stopped before (as
    generate: a stopped row continues with pads), and, for the ``live`` rows, their next ids, their stop
    flags and (with a ``seen`` table) the ids they have chosen, all updated in place. Returns the ids kept."""
    chosen = torch.where(done, PAD_ID, chosen)
    next_ids.copy_(torch.where(live, chosen, next_ids))
    hit = stops.gather(1, chosen[:, None]).squeeze(1)
    done.copy_(done | (hit & live))
    if seen is not None:
        seen.scatter_(1, chosen[:, None], seen.gather(1, chosen[:, None]) | live[:, None])
    return chosen


# ----- per-row parameters (the engine: every row its own settings and its own generator) ---------------


class RowSampling:
    """The next token of each row of a batch whose rows carry their own settings (``DecodeSettings`` each)
    as ``[B, 1]`` tensors, in :func:`next_tokens`' order and arithmetic: a row's ids are the same alone or
    batched with any other rows. Disabled steps are exact no-ops per row (penalty 1: ``x * 1`` / ``x / 1``;
    no top-k: threshold -inf; no top-p: nothing below -1 is removed); a step no row uses is skipped.

    ``rows``: one ``(settings, generated, generator)`` per batch row, or None for a row that takes no token
    this step (a free slot). ``generated`` is how many tokens the row has so far (the min-new-tokens ban);
    ``generator``: the row's own ``torch.Generator`` or None for torch's global one (rows sharing a generator
    draw in one call, in row order)."""

    def __init__(self, rows: list, seen: torch.Tensor | None, stops: torch.Tensor, device) -> None:
        self.rows, self.seen, self.stops, self.device = rows, seen, stops, device
        self.live = [r for r in rows if r is not None]

    def _column(self, value, dtype) -> torch.Tensor:
        values = [value(r[0]) if r is not None else value(None) for r in self.rows]
        return torch.tensor(values, dtype=dtype).view(-1, 1).to(self.device, non_blocking=True)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[B, V]`` -> ids ``[B]`` (0 for rows without a request)."""
        scores = logits
        if self.seen is not None and any(r[0].repetition_penalty != 1.0 for r in self.live):
            penalty = self._column(lambda s: 1.0 if s is None else s.repetition_penalty, torch.float32)
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen[: scores.shape[0]], penalised, scores)
        banned = [r is not None and r[1] < r[0].min_new_tokens for r in self.rows]
        if any(banned):
            rows = torch.tensor(banned, dtype=torch.bool).view(-1, 1).to(self.device, non_blocking=True)
            scores = torch.where(self.stops[: scores.shape[0]] & rows, -float("inf"), scores)
        greedy = torch.argmax(scores, dim=-1)
        if not any(r[0].sampling for r in self.live):
            return greedy
        sampled = self._sample(scores)
        flags = self._column(lambda s: bool(s is not None and s.sampling), torch.bool).view(-1)
        return torch.where(flags, sampled, greedy)

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        live = [r[0] for r in self.live if r[0].sampling]
        scores = scores / self._column(lambda s: 1.0 if s is None or not s.sampling else s.temperature,
                                       torch.float32)
        if any(s.top_k for s in live):
            ks = [min(max(int(r[0].top_k), 1), scores.size(-1)) if r is not None and r[0].top_k else 0
                  for r in self.rows]
            top = torch.topk(scores, max(ks))[0]
            index = torch.tensor([max(k - 1, 0) for k in ks]).view(-1, 1).to(self.device, non_blocking=True)
            threshold = top.gather(1, index)
            off = torch.tensor([k == 0 for k in ks]).view(-1, 1).to(self.device, non_blocking=True)
            threshold = threshold.masked_fill(off, -float("inf"))
            scores = scores.masked_fill(scores < threshold, -float("inf"))
        if any(s.top_p < 1.0 for s in live):
            cut = self._column(lambda s: 1 - s.top_p if s is not None and s.top_p < 1.0 else -1.0, torch.float32)
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= cut
            remove[..., -1:] = False
            remove = remove.scatter(1, sorted_indices, remove)
            scores = scores.masked_fill(remove, -float("inf"))
        probs = torch.softmax(scores, dim=-1)
        return self._draw(probs)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One multinomial call per generator over its rows (in row order)."""
        out = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
        groups: dict[int, tuple[object, list[int]]] = {}
        for index, row in enumerate(self.rows):
            if row is not None and row[0].sampling:
                generator = row[2]
                groups.setdefault(id(generator), (generator, []))[1].append(index)
        for generator, indices in groups.values():
            if len(indices) == probs.shape[0]:
                picked = probs
            else:
                picked = probs.index_select(0, torch.tensor(indices, device=probs.device))
            drawn = torch.multinomial(picked, num_samples=1, generator=generator).squeeze(1)
            if len(indices) == probs.shape[0]:
                out = drawn
            else:
                out.index_copy_(0, torch.tensor(indices, device=probs.device), drawn)
        return out
