"""Answer ids -> answer text, with the reference's ``_decode_text`` quirks (spec vision-llm §8).

Decoding drops **every id 0** (the pad, which is also the token ``!``), a leading ``<|im_start|>`` and one
trailing terminator, and keeps other special tokens; callers remove ``<|tts_eos|>`` where the reference does.
"""

from __future__ import annotations

import torch

from minicpmo_cli.processing.tts_text import LLM_TERMINATORS


def terminator_ids(tokenizer) -> list[int]:
    """The ids of the chat terminators (``<|im_end|>``, ``<|endoftext|>``) in this tokenizer."""
    return [tokenizer.convert_tokens_to_ids(t) for t in LLM_TERMINATORS]


def decode_text(result_ids, tokenizer, terminators: list[int] | None = None) -> list[str]:
    """Reference ``_decode_text``: drop every 0, a leading bos, one trailing terminator; keep specials."""
    terminators = terminator_ids(tokenizer) if terminators is None else terminators
    texts = []
    for row in result_ids:
        row = torch.as_tensor(row)
        row = row[row != 0]
        if len(row) and int(row[0]) == tokenizer.bos_token_id:
            row = row[1:]
        if len(row) and int(row[-1]) in terminators:
            row = row[:-1]
        texts.append(tokenizer.decode(row.tolist()))
    return texts
