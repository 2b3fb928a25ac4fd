"""The MiniCPM-o 2.6 text tokenizer: a Qwen2 byte-level BPE plus the MiniCPM-o special-token names.

The official ``tokenizer_config.json`` names the class ``MiniCPMOTokenizerFast``; registering this class under
that name (see :mod:`minicpmo_cli.registration`) lets ``AutoTokenizer`` load the official files without
running remote code. The token *strings* below are fixed by the model (spec vision-llm §6.1); their ids come
from the tokenizer files, so tiny test tokenizers with other ids work the same way.
"""

from __future__ import annotations

from transformers import Qwen2Tokenizer

# In transformers 5.x the fast Qwen2 tokenizer is ``Qwen2Tokenizer`` (``Qwen2TokenizerFast`` is an alias).


class MiniCPMOTokenizerFast(Qwen2Tokenizer):
    """Qwen2 tokenizer with the attribute names the MiniCPM-o processor and model use.

    Careful: ``im_start``/``im_start_id`` mean ``<image>``, not ``<|im_start|>`` (as in the reference).
    """

    # image markers
    im_start = "<image>"
    im_end = "</image>"
    ref_start = "<ref>"
    ref_end = "</ref>"
    box_start = "<box>"
    box_end = "</box>"
    quad_start = "<quad>"
    quad_end = "</quad>"
    slice_start = "<slice>"
    slice_end = "</slice>"
    im_id_start = "<image_id>"
    im_id_end = "</image_id>"
    image_tag = "(<image>./</image>)"
    image_pattern = r"\(<image>./</image>\)"
    # audio / speech markers
    audio_start = "<|audio_start|>"
    audio_end = "<|audio_end|>"
    spk_start = "<|spk_bos|>"
    spk_end = "<|spk_eos|>"
    tts_start = "<|tts_bos|>"
    tts_end = "<|tts_eos|>"
    audio_tag = "(<audio>./</audio>)"
    audio_pattern = r"\(<audio>./</audio>\)"
    split_pattern = rf"({image_pattern}|{audio_pattern})"
    # The port lists <|tts_eos|> too; the model itself stops only on the first two (spec §8.2).
    terminator_tokens = ("<|im_end|>", "<|endoftext|>", "<|tts_eos|>")

    def _id(self, token: str) -> int:
        return self.convert_tokens_to_ids(token)

    @property
    def eos_id(self) -> int:
        return self.eos_token_id

    @property
    def bos_id(self) -> int:
        return self.bos_token_id

    @property
    def unk_id(self) -> int:
        return self.unk_token_id

    @property
    def terminators(self) -> list[str]:
        return list(self.terminator_tokens)

    @property
    def terminator_ids(self) -> list[int]:
        return [self._id(t) for t in self.terminator_tokens]

    @property
    def im_start_id(self) -> int:
        return self._id(self.im_start)

    @property
    def im_end_id(self) -> int:
        return self._id(self.im_end)

    @property
    def slice_start_id(self) -> int:
        return self._id(self.slice_start)

    @property
    def slice_end_id(self) -> int:
        return self._id(self.slice_end)

    @property
    def im_id_start_id(self) -> int:
        return self._id(self.im_id_start)

    @property
    def im_id_end_id(self) -> int:
        return self._id(self.im_id_end)

    @property
    def audio_start_id(self) -> int:
        return self._id(self.audio_start)

    @property
    def audio_end_id(self) -> int:
        return self._id(self.audio_end)

    @property
    def spk_start_id(self) -> int:
        return self._id(self.spk_start)

    @property
    def spk_end_id(self) -> int:
        return self._id(self.spk_end)

    @property
    def tts_start_id(self) -> int:
        return self._id(self.tts_start)

    @property
    def tts_end_id(self) -> int:
        return self._id(self.tts_end)

    @staticmethod
    def escape(text: str) -> str:
        return text

    @staticmethod
    def unescape(text: str) -> str:
        return text


__all__ = ["MiniCPMOTokenizerFast"]


# Last line on purpose: lets `import minicpmo_cli` finish registering the Auto classes (see __init__.py).
__import__("minicpmo_cli")._module_ready(__name__)
