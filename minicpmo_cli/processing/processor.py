"""``MiniCPMOProcessor``: chat messages (text, PIL images, 16 kHz audio arrays) -> model inputs.

Reproduces the reference ``chat()`` prompt building plus ``MiniCPMOProcessor.__call__`` (spec vision-llm
§6.4-§6.5): message parts joined with "\\n" (or "" for omni input), ``(<image>./</image>)`` and
``(<audio>./</audio>)`` tags replaced by placeholders, the Qwen2 chat template (with its default system turn)
or the TTS template (switched on by any audio), tokenisation, bounds, left padding with id 0.
"""

from __future__ import annotations

import json
import re
from copy import deepcopy
from pathlib import Path
from typing import Any

from minicpmo_cli.processing.prompts import get_sys_prompt as _get_sys_prompt
from minicpmo_cli.units import INPUT_SAMPLE_RATE

IMAGE_TAG = "(<image>./</image>)"
AUDIO_TAG = "(<audio>./</audio>)"
_SPLIT_PATTERN = re.compile(r"(\(<image>\./</image>\)|\(<audio>\./</audio>\))")

# The reference's MiniCPMO.default_tts_chat_template: no default system turn, and a generation prompt that
# ends in the speaker/TTS prefix.
TTS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>' }}{% endif %}"
)


def _is_image(item: Any) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)


def _is_audio(item: Any) -> bool:
    import numpy as np

    return isinstance(item, np.ndarray)


def flatten_messages(msgs: list[dict], omni_input: bool = False) -> tuple[list[dict], list, list, list[int], bool]:
    """Turn rich messages into template-ready ones.

    Returns (messages with str content, images, audios, audio_parts, has_audio); audio_parts holds the
    message index of each audio (audios of one message are merged before feature extraction).
    """
    if isinstance(msgs, str):
        msgs = json.loads(msgs)
    if not msgs:
        raise ValueError("msgs is empty")
    flat = deepcopy([{k: v for k, v in m.items() if k != "content"} for m in msgs])
    images, audios, audio_parts = [], [], []
    for index, (msg, out) in enumerate(zip(msgs, flat)):
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, got {role!r}")
        if index == 0 and role not in ("user", "system"):
            raise ValueError("the role of the first message must be user or system")
        content = msg["content"]
        parts = []
        for item in [content] if isinstance(content, str) else content:
            if _is_image(item):
                images.append(item)
                parts.append(IMAGE_TAG)
            elif _is_audio(item):
                audios.append(item)
                audio_parts.append(index)
                parts.append(AUDIO_TAG)
            elif isinstance(item, str):
                parts.append(item)
            # Other item types are dropped silently, as the reference does.
        out["content"] = ("" if omni_input else "\n").join(parts)
    return flat, images, audios, audio_parts, bool(audios)


class MiniCPMOProcessor:
    """Image processor + audio features + tokenizer of MiniCPM-o 2.6."""

    attributes = ["image_processor", "feature_extractor", "tokenizer"]
    default_tts_chat_template = TTS_CHAT_TEMPLATE

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chunk_length: float = 1.0):
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.audio_chunk_length = chunk_length
        self.version = getattr(image_processor, "version", 2.6)
        self.preprocessor_config: dict = {}  # the raw preprocessor_config.json, kept for save_pretrained

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> MiniCPMOProcessor:
        """Load tokenizer, image processor and feature extractor from a checkpoint folder or hub id."""
        from minicpmo_cli.model.checkpoint_files import resolve_checkpoint_dir
        from minicpmo_cli.processing.tokenizer import MiniCPMOTokenizerFast

        folder = resolve_checkpoint_dir(
            pretrained_model_name_or_path,
            revision=kwargs.get("revision"),
            local_files_only=kwargs.get("local_files_only"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
        )
        tokenizer = MiniCPMOTokenizerFast.from_pretrained(str(folder))
        config_file = folder / "preprocessor_config.json"
        preprocessor_config = json.loads(config_file.read_text()) if config_file.exists() else {}
        processor = cls(
            image_processor=_load_image_processor(preprocessor_config),
            feature_extractor=_load_feature_extractor(preprocessor_config),
            tokenizer=tokenizer,
        )
        processor.preprocessor_config = preprocessor_config
        return processor

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the tokenizer files and the preprocessor_config.json this processor was loaded from."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        config = dict(getattr(self, "preprocessor_config", None) or {})
        if not config:
            config = {k: v for k, v in vars(self.image_processor).items() if isinstance(v, (int, float, str, bool))}
            config.update({"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMOProcessor"})
        (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2, default=_jsonable))

    # ------------------------------------------------------------------ prompts
    def get_sys_prompt(self, ref_audio=None, mode: str = "default", language: str = "zh") -> dict[str, Any]:
        return _get_sys_prompt(ref_audio=ref_audio, mode=mode, language=language)

    def render_prompts(self, msgs, omni_input: bool = False, use_tts_template: bool = False):
        """Message list (or a batch of lists) -> (prompt strings, images per sample, audios, audio parts)."""
        batch = msgs if (len(msgs) > 0 and isinstance(msgs[0], list)) else [msgs]
        prompts, images, audios, parts = [], [], [], []
        for sample in batch:
            flat, sample_images, sample_audios, sample_parts, has_audio = flatten_messages(sample, omni_input)
            # Audio anywhere in a sample switches that sample to the TTS template (as the reference; the flag
            # then stays on for the following samples of the batch too).
            use_tts_template = use_tts_template or has_audio
            prompts.append(
                self.tokenizer.apply_chat_template(
                    flat,
                    tokenize=False,
                    add_generation_prompt=True,
                    chat_template=self.default_tts_chat_template if use_tts_template else None,
                )
            )
            images.append(sample_images)
            audios.append(sample_audios)
            parts.append(sample_parts)
        return prompts, images, audios, parts

    def apply_chat_template(
        self,
        msgs=None,
        chunk_input: bool = True,
        max_slice_nums: int | None = None,
        max_length: int | None = 32768,
        omni_input: bool = False,
        use_image_id: bool | None = None,
        use_tts_template: bool = False,
        max_inp_length: int | None = None,
        **kwargs: Any,
    ):
        """Chat messages -> BatchFeature of model inputs (``chat()`` of the reference, without generating)."""
        if msgs is None:
            msgs = kwargs.pop("conversation", None)
        if max_inp_length is not None:
            max_length = max_inp_length
        prompts, images, audios, parts = self.render_prompts(msgs, omni_input, use_tts_template)
        return self(
            prompts,
            images,
            audios,
            audio_parts=parts,
            max_slice_nums=max_slice_nums,
            use_image_id=use_image_id,
            chunk_input=chunk_input,
            max_length=max_length,
            **kwargs,
        )

    def prompt_inputs(self, msgs, chunk_input: bool = True, use_tts_template: bool = False,
                      max_length: int | None = 32768) -> dict:
        """:meth:`apply_chat_template` without the media tensors, for audio-only messages: ``input_ids``,
        ``attention_mask`` and the bounds, each audio's placeholder sized from its length alone (no log-mel:
        a caller that computes the features of many pieces at once, api/asr_model.py)."""
        from minicpmo_cli.processing.audio import get_audio_placeholder

        prompts, images, audios, _ = self.render_prompts(msgs, False, use_tts_template)
        if any(images):
            raise ValueError("prompt_inputs takes audio-only messages")
        placeholders = [[get_audio_placeholder(len(a), chunk_input=chunk_input, chunk_length=self.audio_chunk_length)
                         for a in sample] for sample in audios]
        return self._convert_to_inputs(prompts, self._process_images(images, None), placeholders, max_length,
                                       None, None)

    # ------------------------------------------------------------------ tensors
    def __call__(
        self,
        text,
        images=None,
        audios=None,
        audio_parts=None,
        max_length: int | None = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = True,
        chunk_input: bool = False,
        return_tensors: str | None = "pt",
        sampling_rate: int = INPUT_SAMPLE_RATE,
        **kwargs: Any,
    ):
        """Prompt text(s) with tags + media -> BatchFeature (the reference processor ``__call__``)."""
        from transformers import BatchFeature

        kwargs.pop("do_pad", None)
        audio_device = kwargs.pop("audio_device", None)  # where log-mel is computed (the model's device)
        texts = [text] if isinstance(text, str) else list(text)
        images = _per_sample(images, len(texts))
        audios = _per_sample(audios, len(texts))
        image_inputs = self._process_images(images, max_slice_nums)
        audio_features, audio_feature_lens, placeholders = self._process_audios(
            audios, audio_parts, chunk_input, sampling_rate, audio_device
        )
        data = self._convert_to_inputs(
            texts, image_inputs, placeholders, max_length, max_slice_nums, use_image_id, **kwargs
        )
        data["audio_features"] = audio_features
        data["audio_feature_lens"] = audio_feature_lens
        return BatchFeature(data=data)

    def _process_images(self, images: list[list], max_slice_nums: int | None) -> dict[str, list]:
        if not any(images):
            # No image anywhere: skip the image processor (empty entries per sample, as the reference gives).
            import torch

            return {
                "pixel_values": [[] for _ in images],
                "image_sizes": [[] for _ in images],
                "tgt_sizes": [torch.zeros((0, 2), dtype=torch.int64) for _ in images],
            }
        if self.image_processor is None:
            raise ValueError("images were given but this processor has no image processor")
        out = self.image_processor(images, max_slice_nums=max_slice_nums, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"], "tgt_sizes": out["tgt_sizes"]}

    def _process_audios(self, audios: list[list], audio_parts, chunk_input: bool, sampling_rate: int,
                        device=None):
        if not any(audios):
            return [], [[] for _ in audios], [[] for _ in audios]
        from minicpmo_cli.processing.audio import extract_audio_features, get_audio_placeholder

        placeholders = [
            [get_audio_placeholder(len(a), chunk_input=chunk_input, chunk_length=self.audio_chunk_length) for a in s]
            for s in audios
        ]
        features, lens = extract_audio_features(
            audios,
            audio_parts=audio_parts,
            chunk_input=chunk_input,
            sampling_rate=sampling_rate,
            chunk_length=self.audio_chunk_length,
            device=device,
        )
        return features, lens, placeholders

    def _expand_placeholders(self, text: str, image_sizes: list, audio_placeholders: list, max_slice_nums, use_image_id):
        chunks = _SPLIT_PATTERN.split(text)
        n_images = sum(chunk == IMAGE_TAG for chunk in chunks)
        n_audios = sum(chunk == AUDIO_TAG for chunk in chunks)
        if n_images != len(image_sizes):
            raise ValueError(f"the prompt has {n_images} image tags but {len(image_sizes)} images were given")
        if n_audios != len(audio_placeholders):
            raise ValueError(f"the prompt has {n_audios} audio tags but {len(audio_placeholders)} audios were given")
        image_index = audio_index = 0
        for i, chunk in enumerate(chunks):
            if chunk == IMAGE_TAG:
                chunks[i] = self.image_processor.get_slice_image_placeholder(
                    image_sizes[image_index], image_index, max_slice_nums, use_image_id
                )
                image_index += 1
            elif chunk == AUDIO_TAG:
                chunks[i] = audio_placeholders[audio_index]
                audio_index += 1
        return "".join(chunks)

    def _convert_to_inputs(self, texts, image_inputs, audio_placeholders, max_length, max_slice_nums, use_image_id,
                           **kwargs):
        ids_list, image_bounds, audio_bounds, spk_bounds = [], [], [], []
        for index, text in enumerate(texts):
            expanded = self._expand_placeholders(
                text, image_inputs["image_sizes"][index], audio_placeholders[index], max_slice_nums, use_image_id
            )
            ids, bounds = self._tokenize_with_bounds(expanded, max_length, **kwargs)
            ids_list.append(ids)
            image_bounds.append(bounds[0])
            audio_bounds.append(bounds[1])
            spk_bounds.append(bounds[2])
        input_ids, pad_lengths = left_pad(ids_list, padding_value=0)
        attention_mask = input_ids.new_ones(input_ids.shape, dtype=bool_dtype())
        for i, pad in enumerate(pad_lengths):
            image_bounds[i] = image_bounds[i] + pad
            audio_bounds[i] = audio_bounds[i] + pad
            spk_bounds[i] = spk_bounds[i] + pad
            attention_mask[i, :pad] = False
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": image_inputs["pixel_values"],
            "image_sizes": image_inputs["image_sizes"],
            "image_bound": image_bounds,
            "tgt_sizes": image_inputs["tgt_sizes"],
            "audio_bounds": audio_bounds,
            "spk_bounds": spk_bounds,
        }

    def _tokenize_with_bounds(self, text: str, max_length: int | None, **kwargs: Any):
        """encode (no BOS), keep the first max_length ids, then find [start, end) of every marked span."""
        import torch

        tok = self.tokenizer
        ids = tok.encode(text, **kwargs)
        if max_length is not None:
            ids = ids[:max_length]  # keeps the head, as the reference (may cut a placeholder; spec §10.11)
        # the marker positions are found in the id list (a text prompt has none): a few tensors per prompt
        # instead of three torch ops per marker id (each one a GIL hand-off in a busy server)
        markers = {tok.im_start_id, tok.slice_start_id, tok.im_end_id, tok.slice_end_id, tok.audio_start_id,
                   tok.audio_end_id, tok.spk_start_id, tok.spk_end_id}
        found = [(index, token) for index, token in enumerate(ids) if token in markers]
        ids = torch.tensor(ids, dtype=torch.int32)

        def where(token_ids):
            return torch.tensor([index for index, token in found if token in token_ids], dtype=torch.long)

        image_starts = where([tok.im_start_id, tok.slice_start_id]) + 1
        image_ends = where([tok.im_end_id, tok.slice_end_id])
        if len(image_starts) != len(image_ends):
            # The reference fails here too (a placeholder cut by max_length, or literal marker text).
            raise ValueError("unbalanced image/slice markers in the prompt (cut by max_length?)")
        image_bound = torch.stack([image_starts, image_ends], dim=-1) if len(image_starts) else torch.zeros((0, 2))
        audio_bound = _pair_bounds(where([tok.audio_start_id]), where([tok.audio_end_id]), "audio")
        spk_bound = _pair_bounds(where([tok.spk_start_id]), where([tok.spk_end_id]), "speaker")
        return ids, (image_bound.long(), audio_bound, spk_bound)

    # ------------------------------------------------------------------ decoding
    def decode_text(self, result_ids, terminators: list[int] | None = None) -> list[str]:
        from minicpmo_cli.processing.answer_text import decode_text

        return decode_text(result_ids, self.tokenizer, terminators)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "tgt_sizes", "image_bound", "audio_features",
                "audio_feature_lens", "audio_bounds", "spk_bounds"]


def bool_dtype():
    import torch

    return torch.bool


def _pair_bounds(starts, ends, what: str):
    import torch

    if len(starts) != len(ends):
        raise ValueError(f"unbalanced {what} markers in the prompt ({len(starts)} starts, {len(ends)} ends)")
    return torch.stack([starts + 1, ends], dim=-1).long() if len(starts) else torch.zeros((0, 2), dtype=torch.long)


def left_pad(sequences: list, padding_value: int = 0):
    """Stack 1-D id tensors, left-padding the short ones with ``padding_value``; returns (tensor, pad lengths)."""
    import torch

    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), padding_value, dtype=sequences[0].dtype)
    pads = []
    for i, seq in enumerate(sequences):
        if len(seq):
            out[i, longest - len(seq):] = seq
        pads.append(longest - len(seq))
    return out, pads


def _per_sample(items, batch_size: int) -> list[list]:
    """Normalise media to a list (one entry per sample) of lists."""
    if items is None:
        return [[] for _ in range(batch_size)]
    if _is_image(items) or _is_audio(items):
        return [[items]]
    items = list(items)
    if items and (_is_image(items[0]) or _is_audio(items[0])):
        return [items]
    return [list(sample or []) for sample in items] + [[] for _ in range(batch_size - len(items))]


def _load_image_processor(preprocessor_config: dict):
    try:
        from minicpmo_cli.processing.image import MiniCPMVImageProcessor
    except ImportError:  # the vision helper's module is optional for text-only use
        return None
    if preprocessor_config:
        return MiniCPMVImageProcessor(**preprocessor_config)
    return MiniCPMVImageProcessor(use_image_id=True, version=2.6)  # the official values


def _load_feature_extractor(preprocessor_config: dict):
    from transformers import WhisperFeatureExtractor

    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value")
    return WhisperFeatureExtractor(**{k: preprocessor_config[k] for k in keys if k in preprocessor_config})


def _jsonable(value: Any):
    return value.tolist() if hasattr(value, "tolist") else str(value)


# Last line on purpose: lets `import minicpmo_cli` finish registering the Auto classes (see __init__.py).
__import__("minicpmo_cli")._module_ready(__name__)
