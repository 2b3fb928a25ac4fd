"""Text side of the TTS: the ChatTTS tokenizer, the 303-position prompt layout, text cleaning and splitting.

Layout (spec audio-tts §3.4): ``[Stts][spk_emb]`` + text + ``[Etts]`` + ``[PAD]``*(300 - L - 1) + ``[Ptts]``
for a text of ``L < 300`` ChatTTS tokens. The reference cuts longer text at 300 tokens (no ``[Etts]``);
:func:`split_tts_text` lets callers avoid that cut by synthesising long answers piece by piece.
"""

from __future__ import annotations

import re
from pathlib import Path

TTS_BOS = "<|tts_bos|>"
TTS_EOS = "<|tts_eos|>"
LLM_TERMINATORS = ("<|im_end|>", "<|endoftext|>")
RESERVED_TEXT_LEN = 300
# Sentence ends the reference's streaming segmenter looks for, in its order of preference.
SENTENCE_END_CHARS = (".", "。", "!", "?", "！", "？")


def load_tts_tokenizer(path: str | Path):
    """The ChatTTS BERT WordPiece tokenizer from ``<model>/assets/chattts_tokenizer`` (no remote code)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(path))


def extract_tts_text(answer: str) -> str:
    """The part of an LLM answer the TTS reads: after the last ``<|tts_bos|>``, before the first
    ``<|tts_eos|>`` (as the reference). Chat terminators are removed too; the reference's decoded answer
    never contains them, so this changes nothing on its path."""
    text = answer.split(TTS_BOS)[-1].split(TTS_EOS)[0]
    for terminator in LLM_TERMINATORS:
        text = text.replace(terminator, "")
    return text


def count_tts_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def prepare_tts_text(tokenizer, text: str, reserved_len: int = RESERVED_TEXT_LEN, num_spk_embs: int = 1):
    """-> (prompt string, number of text tokens L). With ``L >= reserved_len`` the text is cut to
    ``reserved_len`` tokens and re-decoded, with no ``[Etts]`` (reference behaviour)."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if len(tokens) < reserved_len:
        pad = "[Etts]" + "[PAD]" * (reserved_len - len(tokens) - 1)
    else:
        tokens = tokens[:reserved_len]
        text = tokenizer.decode(tokens, add_special_tokens=False)
        pad = ""
    prompt = "[Stts]" + "[spk_emb]" * num_spk_embs + text + pad + "[Ptts]"
    return prompt, len(tokens)


def encode_tts_prompt(tokenizer, prompt: str):
    """Prompt string -> ids ``[1, 303]`` (long tensor)."""
    import torch

    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return torch.tensor([ids], dtype=torch.long)


def build_streaming_text_mask(num_text_tokens: int, reserved_len: int = RESERVED_TEXT_LEN, num_spk_embs: int = 1):
    """int8 ``[1 + spk + reserved + 1]``: ones on ``[Stts]``, spk, the L text tokens, ``[Etts]`` and ``[Ptts]``.

    As the reference, the ``[Etts]`` slot is always marked (even when L == reserved_len, where it does not exist)."""
    import torch

    length = 1 + num_spk_embs + reserved_len + 1
    mask = torch.zeros(length, dtype=torch.int8)
    mask[: 1 + 1 + num_text_tokens + 1] = 1  # reference hard-codes one spk slot here
    mask[-1] = 1
    return mask


def sentence_end(text: str) -> str:
    """First sentence-end character present in ``text`` (reference ``sentence_end``): a ``.`` whose first
    occurrence follows a digit (``1.``) does not count."""
    for char in SENTENCE_END_CHARS:
        if char in text:
            if char == ".":
                idx = text.find(char)
                if idx > 0 and text[idx - 1].isdigit():
                    continue
            return char
    return ""


_DIGITS_ZH = dict(zip("0123456789", "零一二三四五六七八九"))
_DIGITS_EN = dict(zip("0123456789", ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))


def detect_language(text: str) -> str:
    chinese = len(re.findall(r"[\u4e00-\u9fff]", text))
    english = len(re.findall(r"[a-zA-Z]", text))
    return "chinese" if chinese >= english else "english"


def spell_digits(text: str, language: str | None = None) -> str:
    """Streaming-mode normalisation: every digit run is spelled digit by digit (Chinese or English)."""
    language = language or detect_language(text)
    for number in re.findall(r"\d+", text):
        if language == "chinese":
            spelled = "".join(_DIGITS_ZH[d] for d in number if d in _DIGITS_ZH)
        else:
            spelled = " ".join(_DIGITS_EN[d] for d in number if d in _DIGITS_EN)
        text = text.replace(number, spelled, 1)
    return text


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;。！？；…])\s*|\n+")
_CLAUSE_SPLIT = re.compile(r"(?<=[,，、:：])\s*")


def split_tts_text(tokenizer, text: str, max_tokens: int = RESERVED_TEXT_LEN - 1) -> list[str]:
    """Split ``text`` into pieces of at most ``max_tokens`` ChatTTS tokens, at sentence ends first, then at
    clause marks, then at spaces, and as a last resort at token boundaries. Text that fits is returned as
    one piece unchanged, so short answers follow the reference path exactly. The default keeps every piece
    below 300 tokens so each gets its ``[Etts]`` (end of text) and is read in full."""
    if count_tts_tokens(tokenizer, text) <= max_tokens:
        return [text]
    pieces: list[str] = []
    for level in (_SENTENCE_SPLIT, _CLAUSE_SPLIT, re.compile(r"(?<=\s)")):
        parts = [p for p in level.split(text) if p and p.strip()]
        if len(parts) > 1:
            return _pack(tokenizer, parts, max_tokens)
    # No boundary at all: cut at token boundaries.
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for i in range(0, len(tokens), max_tokens):
        pieces.append(tokenizer.decode(tokens[i : i + max_tokens], add_special_tokens=False))
    return pieces


def _pack(tokenizer, parts: list[str], max_tokens: int) -> list[str]:
    """Greedily join consecutive parts while they fit; parts that are too long alone are split further."""
    pieces: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current} {part}".strip() if current else part.strip()
        if count_tts_tokens(tokenizer, candidate) <= max_tokens:
            current = candidate
            continue
        if current:
            pieces.append(current)
        if count_tts_tokens(tokenizer, part) <= max_tokens:
            current = part.strip()
        else:
            pieces.extend(split_tts_text(tokenizer, part, max_tokens))
            current = ""
    if current:
        pieces.append(current)
    return pieces
