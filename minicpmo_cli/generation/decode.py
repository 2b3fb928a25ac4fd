"""The decoding core's entry points: prefill, decode_one_token, and :func:`generate_ids`, the wrapper every
greedy or sampled LLM answer goes through.

- :class:`DecodeSettings` (generation/settings.py): the one fully resolved, typed settings object it takes.
- :func:`prefill`: the prompt pass, made by transformers' own ``Qwen2Model.forward`` exactly as ``generate``
  makes it (same positions and mask), its key/values copied into a preallocated :class:`StaticKV`. Its
  final-norm hidden states are returned (the TTS speaker state is read from them: no hook on the model).
- :func:`decode_one_token`: one step over one caller's :class:`StaticKV` (a streaming session's).
- :func:`generate_ids`: submits each row of a batch to the engine (generation/engine.py: KV slots, per-row
  sampling, ids read back every ``CHECK_EVERY`` tokens unless streaming) and waits; without an engine a
  short-lived one serves the call.

Beam search is not here: transformers ``generate`` still does it (generation/text.py).
"""

from __future__ import annotations

from threading import Event
from typing import Callable

import torch

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.engine import CHECK_EVERY as ENGINE_CHECK_EVERY
from minicpmo_cli.generation.engine import LLMEngine, Request
from minicpmo_cli.generation.settings import PAD_ID, DecodeSettings, cut_at_stop
from minicpmo_cli.generation.static_cache import StaticKV
from minicpmo_cli.generation.step_runner import StepRunner, resolve_step

CHECK_EVERY = ENGINE_CHECK_EVERY  # tokens between two host reads of a non-streaming decode (generation/engine.py)


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
                     valid: torch.Tensor | None, runner: StepRunner | None = None) -> torch.Tensor:
    """Feed ``tokens`` ``[B]`` at ``positions`` ``[B]``; float32 logits ``[B, V]`` of the next token (one
    :class:`StaticKV` of one caller, e.g. a streaming session; the engine's rows use KV slots instead).

    ``valid``: bool ``[B, capacity]`` (False at left padding) for a padded batch, else None. ``runner``: the
    engine's step runner (None or eager: the eager step); graph/compile run the fixed-shape step over the
    whole capacity, keyed by the cache's buffer generation.
    """
    if runner is not None and runner.static_shapes:
        index = torch.full((1,), cache.length, dtype=torch.long, device=tokens.device)
        if valid is None:
            valid = torch.ones(cache.batch, cache.capacity, dtype=torch.bool, device=tokens.device)
        written = torch.arange(cache.capacity, device=tokens.device) <= cache.length
        mask = (valid & written)[:, None, None, :]
        if runner.mode == "compile" and tokens.device.type == "cuda":
            cache.mark_static()
        key = (cache.batch, cache.capacity, cache.generation)
        logits = runner.run(key, _static_step, (tokens, positions[:, None], index, mask),
                            (llm, cache.keys, cache.values))
        cache.advance(1)
        return logits
    mask = None if valid is None else valid[:, None, None, :cache.length + 1]
    return fwd.decode_step(llm, tokens, positions[:, None], cache, mask)


def _static_step(tokens, positions, index, mask, llm, keys, values):
    return fwd.static_step(llm, tokens, positions, index, mask, keys, values)


def split_rows(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """A left-padded batch ``[B, L, D]`` -> one unpadded prompt ``[L_i, D]`` per row."""
    if attention_mask is None:
        return list(inputs_embeds.unbind(0))
    mask = attention_mask.to(inputs_embeds.device).bool()
    return [row[keep] for row, keep in zip(inputs_embeds.unbind(0), mask.unbind(0))]


def short_lived_engine(llm, rows: int, step: str | None = None) -> LLMEngine:
    """An engine for one call (the library path without an api Engine): stepped by the caller, no thread."""
    device = llm.lm_head.weight.device
    return LLMEngine(llm, runner=StepRunner(resolve_step(step, device)), max_batch=rows, threaded=False)


@torch.inference_mode()
def generate_ids(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, settings: DecodeSettings,
                 *, on_token: Callable[[list[int]], bool | None] | None = None, engine: LLMEngine | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 on_prefill: Callable[[torch.Tensor], None] | None = None,
                 cancel: Event | None = None) -> list[list[int]]:
    """New ids per row (a row's stop token included when it stopped), greedy or sampled as ``generate``.

    Each row is submitted to ``engine`` (generation/engine.py; None: a short-lived one for this call) and
    waited for, so that calls from several threads share its steps. ``on_token(ids)``: called after every
    step with one id per row (``PAD_ID`` for finished rows); returning True stops the decode.
    ``on_prefill(hidden)``: the prompt's final-norm hidden states ``[B, L, D]`` (rows placed as the padded
    input, zeros at the padding). ``generator``: one generator the rows draw from (in row order); ``seed``: a
    private generator per row instead. ``cancel``: set from another thread, the rows are aborted.
    """
    if settings.beam_search:
        raise UsageError("beam search is not done by the decode core (use transformers generate)")
    prompts = split_rows(inputs_embeds, attention_mask)
    if engine is None:
        engine = short_lived_engine(llm, len(prompts))
    hidden: list = [None] * len(prompts)
    handles = []
    try:
        for index, prompt in enumerate(prompts):
            keep = None if on_prefill is None else (lambda h, i=index: hidden.__setitem__(i, h))
            request = Request(prompt, settings, seed=seed, generator=generator, on_prefill=keep,
                              stream=on_token is not None)
            handles.append(engine.submit(request))
        if on_token is None:
            rows = _wait_all(handles, cancel)
        else:
            rows = _lockstep(handles, on_token, cancel)
    finally:
        for handle in handles:
            if not handle.done:
                engine.abort(handle)
        if not engine.threaded and not engine.idle:
            engine.step()  # a short-lived engine frees what it held
    if on_prefill is not None and all(h is not None for h in hidden):
        on_prefill(_padded_hidden(hidden, inputs_embeds, attention_mask))
    return [cut_at_stop(row, settings.stop_ids) for row in rows]


def _wait_all(handles, cancel: Event | None) -> list[list[int]]:
    if cancel is None:
        return [handle.result() for handle in handles]
    for handle in handles:
        while not handle.done and not cancel.is_set():
            if handle.engine.threaded:
                handle._done.wait(0.05)
            else:
                handle.engine.step()
    failed = next((handle.error for handle in handles if handle.error is not None), None)
    if failed is not None:
        raise failed  # as handle.result() raises it: a cancellable call must not hide an engine failure
    return [list(handle.ids) for handle in handles]


def _lockstep(handles, on_token, cancel: Event | None) -> list[list[int]]:
    """One id per row per step to ``on_token`` (PAD_ID once a row has finished); what it was handed is the
    result (ids decoded past a stop request are not)."""
    rows: list[list[int]] = [[] for _ in handles]
    streams = [handle.tokens() for handle in handles]
    live = [True] * len(handles)
    while any(live):
        step = []
        for index, stream in enumerate(streams):
            token = next(stream, None) if live[index] else None
            if token is None:
                live[index] = False
                step.append(PAD_ID)
            else:
                rows[index].append(token)
                step.append(token)
        if not any(live):
            break
        if on_token(step) or (cancel is not None and cancel.is_set()):
            break
    return rows


def _padded_hidden(hidden: list[torch.Tensor], embeds: torch.Tensor, attention_mask) -> torch.Tensor:
    if attention_mask is None:
        return torch.stack(hidden)
    out = hidden[0].new_zeros((embeds.shape[0], embeds.shape[1], hidden[0].shape[-1]))
    mask = attention_mask.to(embeds.device).bool()
    for index, row in enumerate(hidden):
        out[index, mask[index]] = row
    return out
