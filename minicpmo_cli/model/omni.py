"""``MiniCPMOModel``: the MiniCPM-o 2.6 modules (Qwen2 LLM + SigLIP/resampler + Whisper + ChatTTS), native on 5.x.

Pure modules, embeddings and loading: nothing here knows prompts or decoding. The guide's methods
(``generate``, ``chat``, ``streaming_*``, sessions) are bound on top of this class by ``MiniCPMO`` in
generation/guide.py, so this layer imports nothing above itself.

Module names are the official ones (``llm``, ``vpm``, ``resampler``, ``apm``, ``audio_avg_pooler``,
``audio_projection_layer``, ``tts``) so the official safetensors load unchanged. The towers live in their own
modules (vision.py, audio.py, tts.py) and are imported only when built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from minicpmo_cli.model.config import MiniCPMOConfig
from minicpmo_cli.model.layers import MultiModalProjector


class MiniCPMOPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMOConfig
    config: MiniCPMOConfig
    base_model_prefix = "llm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]


class MiniCPMOModel(MiniCPMOPreTrainedModel):
    """MiniCPM-o 2.6's modules. Build with :meth:`from_pretrained`; ``MiniCPMO`` (generation/guide.py) adds the
    usage guide's generation/chat interface."""

    def __init__(self, config: MiniCPMOConfig) -> None:
        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config)
        self.embed_dim = config.hidden_size
        if config.init_vision:
            self._build_vision()
        if config.init_audio:
            self._build_audio()
        if config.init_tts:
            self._build_tts()
        self.processor = None  # set by from_pretrained when the checkpoint has the processor files
        self.tts_processor = None
        self.vocos = None
        self.name_or_path = getattr(config, "_name_or_path", "")
        self.post_init()

    def _build_vision(self) -> None:
        from minicpmo_cli.model.vision import NavitSiglipVisionTransformer, Resampler

        config = self.config
        # As the reference: the vision tower uses eager attention unless the model runs flash attention.
        attn = "sdpa" if config._attn_implementation == "flash_attention_2" else "eager"
        self.vpm = NavitSiglipVisionTransformer(
            config.vision_config, attn_implementation=attn, drop_last_layer=bool(config.drop_vision_last_layer)
        )
        self.vision_dim = self.vpm.embed_dim
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=self.embed_dim,
            num_heads=self.embed_dim // 128,
            kv_dim=self.vision_dim,
        )

    def _build_audio(self) -> None:
        from minicpmo_cli.model.audio import MiniCPMWhisperEncoder

        config = self.config
        self.apm = MiniCPMWhisperEncoder(config.audio_config)
        audio_output_dim = int(config.audio_config.encoder_ffn_dim // 4)
        self.audio_avg_pooler = nn.AvgPool1d(config.audio_pool_step, stride=config.audio_pool_step)
        self.audio_projection_layer = MultiModalProjector(in_dim=audio_output_dim, out_dim=self.embed_dim)
        self.audio_encoder_layer = -1

    def _build_tts(self) -> None:
        from minicpmo_cli.model.tts import ConditionalChatTTS

        self.tts = ConditionalChatTTS(self.config.tts_config)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        dtype: Any = None,  # None: the checkpoint's (config.json); "auto": the device's best (model/devices.py)
        torch_dtype: Any = None,
        attn_implementation: str | None = None,
        device_map: Any = None,
        init_vision: bool | None = None,
        init_audio: bool | None = None,
        init_tts: bool | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        config: MiniCPMOConfig | None = None,
        quantize: str | None = None,  # none | int8 | int4 (LLM decoder linears); None: as the checkpoint is
        clock: Any = None,  # a minicpmo_cli.startup.StartupClock marking the load's phases
        **_ignored: Any,  # e.g. trust_remote_code from AutoModel: nothing remote is ever run
    ) -> MiniCPMOModel:
        """Load the official checkpoint (folder or hub id) strictly by the official tensor names."""
        from minicpmo_cli.model import loading
        from minicpmo_cli.model.checkpoint_files import resolve_checkpoint_dir

        folder = resolve_checkpoint_dir(
            pretrained_model_name_or_path, revision, local_files_only, cache_dir, token
        )
        if config is None:
            if not (folder / "config.json").exists():
                from minicpmo_cli.errors import ModelLoadError

                raise ModelLoadError("no config.json in the checkpoint folder", folder)
            config = MiniCPMOConfig.from_pretrained(str(folder))
        for flag, value in (("init_vision", init_vision), ("init_audio", init_audio), ("init_tts", init_tts)):
            if value is not None:
                setattr(config, flag, bool(value))
        config._attn_implementation = attn_implementation or "sdpa"
        config._name_or_path = str(folder)
        from minicpmo_cli.model import devices

        # Not given: on the CPU, in the checkpoint's dtype (as transformers); "auto": see model/devices.py.
        device = None if device_map is None else devices.resolve_device(device_map)
        dtype = torch_dtype if torch_dtype is not None else dtype
        dtype = devices.resolve_dtype(dtype if dtype is not None else getattr(config, "dtype", None) or "float32",
                                      device or "cpu")
        try:
            # Parameters on meta, filled from the files on their device (quantized as asked): see loading.py.
            model = loading.build_and_load(cls, config, folder, dtype, device, quantize, clock=clock)
        except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
            from minicpmo_cli.errors import EnvironmentProblem

            raise EnvironmentProblem(f"attn_implementation={config._attn_implementation!r} cannot be used: {exc}")
        model.eval()
        return model

    def init_tts(self, tts_text_tokenizer_path: str | None = None, vocos_ckpt_path: str | None = None) -> None:
        """Load the TTS text tokenizer (``assets/chattts_tokenizer``) and the vocoder (``assets/Vocos.pt``)."""
        from transformers import BertTokenizerFast

        from minicpmo_cli.errors import ModelLoadError
        from minicpmo_cli.model.vocoder import load_vocos

        if not hasattr(self, "tts"):
            raise ModelLoadError("this model was loaded without the TTS tower (init_tts=False)")
        base = Path(self.name_or_path or ".")
        tokenizer_path = Path(tts_text_tokenizer_path or base / "assets" / "chattts_tokenizer")
        vocos_path = Path(vocos_ckpt_path or base / "assets" / "Vocos.pt")
        for path in (tokenizer_path, vocos_path):
            if not path.exists():
                raise ModelLoadError("TTS asset not found in the checkpoint folder", path)
        self.tts_processor = BertTokenizerFast.from_pretrained(str(tokenizer_path))
        # The vocoder always runs in float32, as the reference.
        self.vocos = load_vocos(vocos_path, self.config.tts_config, device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.lm_head

    def get_vllm_embedding(self, data: dict) -> tuple[torch.Tensor, list]:
        """Token embeddings with the vision rows scattered into ``image_bound`` (reference semantics)."""
        embed = self.llm.model.embed_tokens
        vision_states = data.get("vision_hidden_states")
        if vision_states is None:
            vision_states = self._encode_vision(data, embed.weight.dtype)
        input_ids = data["input_ids"].to(embed.weight.device)
        embeds = embed(input_ids)
        merged = embeds.clone()
        for i in range(len(input_ids)):
            states = vision_states[i] if i < len(vision_states) else []
            bounds = data.get("image_bound", [[]] * len(input_ids))[i]
            if len(states) == 0 or len(bounds) == 0:
                continue
            index = torch.cat([torch.arange(int(s), int(e), dtype=torch.long) for s, e in bounds]).to(embeds.device)
            rows = states.reshape(-1, states.shape[-1]).to(embeds.dtype)
            if rows.shape[0] != index.numel():
                raise ValueError(f"{rows.shape[0]} vision embeddings for {index.numel()} image placeholder positions")
            merged[i, index] = rows
        return merged, vision_states

    def _encode_vision(self, data: dict, dtype: torch.dtype) -> list:
        pixel_values = data.get("pixel_values") or []
        batch = len(data["input_ids"])
        if not any(len(sample) for sample in pixel_values):
            return [[] for _ in range(batch)]
        if not hasattr(self, "vpm"):
            raise ValueError("images were given but this model was loaded without the vision tower")
        from minicpmo_cli.model.vision import encode_images

        return encode_images(
            self.vpm, self.resampler, pixel_values, list(data["tgt_sizes"]),
            vision_batch_size=int(self.config.vision_batch_size), dtype=dtype,
        )

    def get_audio_embedding(self, data: dict, chunk_length: float = -1, stream_input: bool = False) -> list:
        """Audio embeddings per sample. ``stream_input`` (the streaming encoder with a session's cache) needs a
        session: ``MiniCPMO`` (generation/guide.py) binds it to its default session."""
        if stream_input:
            raise ValueError("stream_input=True needs a streaming session: use minicpmo_cli.MiniCPMO")
        features = data.get("audio_features")
        if features is None or len(features) == 0:
            return []
        self._require_audio()
        from minicpmo_cli.model import audio

        return audio.get_audio_embedding(
            self.apm, self.audio_projection_layer, self.audio_avg_pooler, features, data["audio_feature_lens"],
            chunk_length=chunk_length, dtype=self.llm.model.embed_tokens.weight.dtype,
        )

    def streaming_audio_embedding(self, data: dict, past):
        """(audio embeddings, updated cache) through the streaming encoder; ``past``: the caller's cache."""
        features = data.get("audio_features")
        if features is None or len(features) == 0:
            return [], past
        self._require_audio()
        from minicpmo_cli.model import audio

        return audio.get_audio_embedding_streaming(
            self.apm, self.audio_projection_layer, self.audio_avg_pooler, features,
            data["audio_feature_lens"], past, dtype=self.llm.model.embed_tokens.weight.dtype,
        )

    def _require_audio(self) -> None:
        if not hasattr(self, "apm"):
            raise ValueError("audio was given but this model was loaded without the audio tower")

    def get_omni_embedding(self, data: dict, input_embeddings: torch.Tensor, chunk_length: float = -1,
                           stream_input: bool = False) -> torch.Tensor:
        """Copy the audio embeddings into the ``audio_bounds`` ranges (in place, as the reference)."""
        return self.insert_audio_embeddings(data, input_embeddings,
                                            self.get_audio_embedding(data, chunk_length, stream_input))

    def insert_audio_embeddings(self, data: dict, input_embeddings: torch.Tensor, audio_embeds) -> torch.Tensor:
        """Write ``audio_embeds`` (per sample, per piece) into the ``audio_bounds`` rows of ``input_embeddings``."""
        if not audio_embeds:
            return input_embeddings
        for i, bounds in enumerate(data["audio_bounds"]):
            if i >= len(audio_embeds) or len(audio_embeds[i]) == 0 or len(bounds) == 0:
                continue
            if self.config.chunk_input:
                # All audios of the sample back to back, cut along the bounds in order (1 s chunks).
                rows = torch.cat(list(audio_embeds[i]), dim=0).to(input_embeddings.device, input_embeddings.dtype)
                start = 0
                for s, e in bounds:
                    length = int(e) - int(s)
                    input_embeddings[i, int(s):int(e)] = rows[start:start + length]
                    start += length
            else:
                for rows, (s, e) in zip(audio_embeds[i], bounds):
                    if rows.shape[0] != int(e) - int(s):
                        raise ValueError(f"{rows.shape[0]} audio embeddings for {int(e) - int(s)} placeholders")
                    input_embeddings[i, int(s):int(e)] = rows.to(input_embeddings.dtype)
        return input_embeddings

    def get_inputs_embeds(self, data: dict) -> tuple[torch.Tensor, list]:
        """Merged LLM input embeddings for processor outputs (vision, then audio with 1 s chunked Whisper)."""
        embeds, vision_states = self.get_vllm_embedding(data)
        embeds = self.get_omni_embedding(data, embeds, chunk_length=self.config.audio_chunk_length)
        return embeds, vision_states

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        data: dict | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Teacher-forced LLM pass over processor outputs; returns the LLM output (``.logits``).

        Accepts the reference call ``forward(data={...})`` and ``model(**processor_outputs)``. Unlike the
        reference (which ignores the mask in ``data``), the attention mask is passed on, so left-padded
        batches are masked; for unpadded inputs the results are the same.
        """
        data = dict(data or {})
        model_keys = ("pixel_values", "tgt_sizes", "image_bound", "audio_features", "audio_feature_lens",
                      "audio_bounds", "spk_bounds", "vision_hidden_states", "image_sizes")
        for key in model_keys:
            if key in kwargs:
                data[key] = kwargs.pop(key)
        if input_ids is not None:
            data["input_ids"] = input_ids
        attention_mask = data.get("attention_mask") if attention_mask is None else attention_mask
        position_ids = data.get("position_ids") if position_ids is None else position_ids
        for key in ("inputs_embeds", "labels_ids"):
            kwargs.pop(key, None)
        embeds, _ = self.get_inputs_embeds(data)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, embeds.shape[1], embeds.device)
        mask = None if attention_mask is None else attention_mask.to(embeds.device).long()
        return self.llm(input_ids=None, inputs_embeds=embeds, attention_mask=mask,
                        position_ids=position_ids.long().to(embeds.device), **kwargs)


def positions_from_mask(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """RoPE positions: cumsum(mask) - 1 with pads set to 1 (as the reference), or 0..L-1 without a mask."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0)
    mask = attention_mask.to(device).long()
    positions = mask.cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


# Last line on purpose: lets `import minicpmo_cli` finish registering the Auto classes (see __init__.py).
__import__("minicpmo_cli")._module_ready(__name__)
