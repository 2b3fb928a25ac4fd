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


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mark ``tokens`` ``[B]`` in the ``seen`` table ``[B, V]`` (in place; returns it)."""
    return seen.scatter_(1, tokens[:, None], True)
