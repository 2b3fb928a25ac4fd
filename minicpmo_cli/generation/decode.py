"""The decoding core every greedy or sampled LLM answer goes through: prefill, decode_one_token, token loop.

- :class:`DecodeSettings` (generation/settings.py): the one fully resolved, typed settings object it takes.
- :func:`prefill`: the prompt pass, made by transformers' own ``Qwen2Model.forward`` exactly as ``generate``
  makes it (same positions and mask), its key/values copied into a preallocated :class:`StaticKV` sized to
  the prompt plus ``max_new_tokens`` (bucketed). Its final-norm hidden states are returned (the TTS speaker
  state is read from them: no hook on the model).
- :func:`decode_one_token`: one step over the static cache (generation/forward.py ``decode_step``, eager and
  bit-identical to transformers, or ``run_compiled``, captured).
- :func:`generate_ids`: the token loop. Sampling happens on the device (generation/sampling.py). Without a
  callback nothing is read back per token: stops are checked every ``CHECK_EVERY`` tokens, and then finished
  rows leave the batch. With ``on_token`` (streaming) each token is handed over as it is chosen.

Beam search is not here: transformers ``generate`` still does it (generation/text.py).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.sampling import mark_seen, next_tokens
from minicpmo_cli.generation.settings import PAD_ID, DecodeSettings, cut_at_stop
from minicpmo_cli.generation.static_cache import StaticKV, bucket_length

CHECK_EVERY = 8  # tokens between two stop checks (the only host reads of a non-streaming decode)


COMPILE_ENV = "MINICPMO_COMPILE"


def resolve_compile(flag: bool | None, device) -> bool:
    """Whether to capture the decode step: the flag when given, else ``MINICPMO_COMPILE`` (1/0, true/false),
    else on for CUDA and off for the CPU (where compiling costs more than it saves on short answers)."""
    if flag is not None:
        return bool(flag)
    env = os.environ.get(COMPILE_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return torch.device(device).type == "cuda"


def prompt_positions(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """As ``generate`` derives them: ``cumsum(mask) - 1`` with pads at 1, or ``0..L-1`` without a mask."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.inference_mode()
def prefill(llm, embeds: torch.Tensor, attention_mask: torch.Tensor | None, capacity: int):
    """The prompt pass: (final-norm hidden ``[B, L, D]``, float32 last logits ``[B, V]``, filled StaticKV)."""
    from transformers import DynamicCache

    decoder = llm.model
    positions = prompt_positions(attention_mask, embeds.shape[1], embeds.device)
    cache = DynamicCache(config=llm.config)
    out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                  **{fwd.cache_keyword(type(decoder)): cache})
    hidden = out.last_hidden_state
    logits = llm.lm_head(hidden[:, -1:]).float()[:, -1]
    return hidden, logits, StaticKV.from_layers(cache.layers, capacity)


def decode_one_token(llm, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKV,
                     valid: torch.Tensor | None, compile: bool = False) -> torch.Tensor:
    """Feed ``tokens`` ``[B]`` at ``positions`` ``[B]``; float32 logits ``[B, V]`` of the next token.

    ``valid``: bool ``[B, capacity]`` (False at left padding) for a padded batch, else None.
    """
    if compile:
        index = torch.full((1,), cache.length, dtype=torch.long, device=tokens.device)
        if valid is None:
            valid = torch.ones(cache.batch, cache.capacity, dtype=torch.bool, device=tokens.device)
        written = torch.arange(cache.capacity, device=tokens.device) <= cache.length
        mask = (valid & written)[:, None, None, :]
        logits = fwd.run_compiled(llm, tokens, positions[:, None], index, mask, cache)
        cache.advance(1)
        return logits
    mask = None if valid is None else valid[:, None, None, :cache.length + 1]
    return fwd.decode_step(llm, tokens, positions[:, None], cache, mask)


class _Rows:
    """The live rows of a batched decode: which original row each is, and its per-row state."""

    def __init__(self, batch: int, attention_mask, embeds, cache: StaticKV, settings: DecodeSettings, vocab: int):
        device = embeds.device
        length = embeds.shape[1]
        self.ids = torch.arange(batch, device=device)
        if attention_mask is None:
            self.positions = torch.full((batch,), length, dtype=torch.long, device=device)
            self.valid = None
        else:
            mask = attention_mask.to(device).bool()
            self.positions = mask.long().sum(-1)
            padded = not bool(mask.all())  # one read, before the loop
            self.valid = None
            if padded:
                self.valid = torch.ones(batch, cache.capacity, dtype=torch.bool, device=device)
                self.valid[:, :length] = mask
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seen = (torch.zeros(batch, vocab, dtype=torch.bool, device=device)
                     if settings.repetition_penalty != 1.0 else None)

    def keep(self, index: torch.Tensor, cache: StaticKV, logits: torch.Tensor, tokens: torch.Tensor):
        for name in ("ids", "positions", "valid", "done", "seen"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        cache.keep_rows(index)
        return logits.index_select(0, index), tokens.index_select(0, index)


def _rows_to_keep(done: torch.Tensor, compile: bool) -> torch.Tensor | None:
    """Indices of the rows that stay (None: keep all). Captured steps keep power-of-two batch sizes (finished
    rows fill up the rest), so compaction does not make a new shape for every count of live rows."""
    live = (~done).nonzero().flatten()
    count, batch = live.numel(), done.numel()
    target = (1 << max(count - 1, 0).bit_length()) if compile else count
    if target >= batch or count == 0:
        return None
    if target > count:
        filler = done.nonzero().flatten()[: target - count]
        live = torch.cat([live, filler])
    return live


@torch.inference_mode()
def generate_ids(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, settings: DecodeSettings,
                 *, on_token: Callable[[list[int]], bool | None] | None = None, compile: bool = False,
                 generator: torch.Generator | None = None,
                 on_prefill: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """New ids per row (a row's stop token included when it stopped), greedy or sampled as ``generate``.

    ``on_token(ids)``: called after every step with one id per original row (``PAD_ID`` for finished rows);
    returning True stops the decode. ``on_prefill(hidden)``: receives the prompt's final-norm hidden states.
    ``compile``: run the decode step captured (torch.compile; CUDA graphs on CUDA).
    """
    if settings.beam_search:
        raise UsageError("beam search is not done by the decode core (use transformers generate)")
    batch, length = inputs_embeds.shape[:2]
    capacity = bucket_length(length + settings.max_new_tokens)
    hidden, logits, cache = prefill(llm, inputs_embeds, attention_mask, capacity)
    if on_prefill is not None:
        on_prefill(hidden)
    del hidden
    device = inputs_embeds.device
    rows = _Rows(batch, attention_mask, inputs_embeds, cache, settings, logits.shape[-1])
    stops = torch.tensor(settings.stop_ids or [-1], dtype=torch.long, device=device)
    banned = torch.isin(torch.arange(logits.shape[-1], device=device), stops) if settings.min_new_tokens else None
    out = torch.full((batch, settings.max_new_tokens), PAD_ID, dtype=torch.long, device=device)
    steps = 0
    for step in range(settings.max_new_tokens):
        ban = banned if step < settings.min_new_tokens else None
        tokens = next_tokens(logits, settings, rows.seen, ban, None, generator)
        tokens = torch.where(rows.done, PAD_ID, tokens)  # as generate: a finished row continues with pads
        out[rows.ids, step] = tokens
        steps = step + 1
        if rows.seen is not None:
            mark_seen(rows.seen, tokens)
        rows.done = rows.done | torch.isin(tokens, stops)
        if on_token is not None:
            if on_token(out[:, step].tolist()) or bool(rows.done.all()):
                break
        if steps == settings.max_new_tokens:
            break
        if on_token is None and steps % CHECK_EVERY == 0:
            if bool(rows.done.all()):
                break
            keep = _rows_to_keep(rows.done, compile)
            if keep is not None:
                logits, tokens = rows.keep(keep, cache, logits, tokens)
        logits = decode_one_token(llm, tokens, rows.positions, cache, rows.valid, compile)
        rows.positions = rows.positions + 1
    return [cut_at_stop(row, settings.stop_ids) for row in out[:, :steps].tolist()]

