"""Turning an already-built chat prompt into the TTS chat template's prompt, on token ids.

The usage guide's instruction-to-speech snippet builds its inputs with a plain
``processor.apply_chat_template(msgs)`` (no audio in the messages, so the Qwen2 template with its default
system turn) and asks for the TTS template only later, in ``generate(..., use_tts_template=True,
generate_audio=True)``. The reference's processor-based API renders the prompt in ``generate``; ours
renders it in the processor, so ``generate`` rewrites the ids instead: it drops the default system turn the
Qwen2 template added and appends ``<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>`` after the generation prompt,
which gives exactly the ids ``apply_chat_template(msgs, use_tts_template=True)`` would have produced.
"""

from __future__ import annotations

import torch

TTS_SUFFIX = "<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
_PROBE = [{"role": "user", "content": "probe"}]


def default_system_prefix(tokenizer) -> str:
    """The text the tokenizer's own chat template puts before the messages when there is no system turn."""
    from minicpmo_cli.processing.processor import TTS_CHAT_TEMPLATE

    plain = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    tts = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True,
                                        chat_template=TTS_CHAT_TEMPLATE)
    body = tts[: -len(TTS_SUFFIX)]
    return plain[: -len(body)] if plain.endswith(body) else ""


def needs_tts_prompt(data: dict) -> bool:
    bounds = data.get("spk_bounds")
    return bounds is None or all(len(b) == 0 for b in bounds)


def apply_tts_template(data: dict, attention_mask, tokenizer) -> tuple[dict, torch.Tensor | None]:
    """Rewrite a batch-1 plain-template prompt (ids, mask, bounds) into the TTS template's prompt."""
    ids = data["input_ids"]
    if ids.shape[0] != 1:
        from minicpmo_cli.errors import UsageError

        raise UsageError("speech output works on one conversation at a time")
    row = ids[0]
    start = int((attention_mask[0] == 0).sum()) if attention_mask is not None else 0  # left padding
    row = row[start:]
    prefix = tokenizer.encode(default_system_prefix(tokenizer), add_special_tokens=False)
    drop = len(prefix) if prefix and row[: len(prefix)].tolist() == prefix else 0
    suffix = torch.tensor(tokenizer.encode(TTS_SUFFIX, add_special_tokens=False), dtype=row.dtype,
                          device=row.device)
    new_row = torch.cat([row[drop:], suffix])
    shift = start + drop
    out = dict(data)
    out["input_ids"] = new_row.unsqueeze(0)
    for key in ("image_bound", "audio_bounds"):
        if key in data and data[key] is not None:
            out[key] = [b - shift if len(b) else b for b in data[key]]
    spk_position = len(new_row) - 3  # <|spk|> sits between <|spk_bos|> and <|spk_eos|>
    out["spk_bounds"] = [torch.tensor([[spk_position, spk_position + 1]], device=row.device)]
    mask = torch.ones_like(out["input_ids"]) if attention_mask is not None else None
    return out, mask
