"""Configuration of MiniCPM-o 2.6, read from the official ``config.json`` unchanged.

The top level is a Qwen2 config (the LLM) plus the multimodal keys; ``vision_config`` is a SigLIP vision
config, ``audio_config`` a Whisper config and ``tts_config`` our :class:`ConditionalChatTTSConfig`.
Values the reference hard-codes (DVAE and Vocos sizes, 64 resampler queries, ...) are fields with the
official values as defaults so tiny test checkpoints can shrink them.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, Qwen2Config, SiglipVisionConfig, WhisperConfig

from minicpmo_cli.units import OUTPUT_SAMPLE_RATE

# Class defaults of the reference's ConditionalChatTTSConfig (spec audio-tts §3.1); config.json only
# overrides llm_dim. The DVAE and Vocos sizes are hard-coded in the reference (spec §4, §5).
TTS_DEFAULTS: dict[str, Any] = {
    "llm_dim": 2560,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 20,
    "max_position_embeddings": 4096,
    "num_audio_tokens": 626,
    "num_text_tokens": 21178,
    "num_mel_bins": 100,
    "num_vq": 4,
    "use_speaker_embedding": True,
    "use_llm_hidden_state": False,
    "spk_emb_token_id": 21143,
    "num_spk_embs": 1,
    "audio_bos_token_id": 21132,
    "text_eos_token_id": 21133,
    "use_text": True,
    "streaming": True,
    "streaming_text_chunk_size": 10,
    "streaming_text_reserved_len": 300,
    "streaming_audio_chunk_size": 50,
    "attn_implementation": "sdpa",
    "use_mlp": True,
    "aug_loss_weight": True,
    "do_sample": True,
    "top_p": 0.7,
    "top_k": 20,
    "repetition_penalty": 1.0,
    # Hard-coded in the reference; settable here for tiny checkpoints.
    "dvae_hidden": 256,
    "dvae_inner": 1024,
    "dvae_bn_dim": 128,
    "dvae_num_layers": 12,
    "dvae_idim": 512,
    "vocos_dim": 512,
    "vocos_intermediate_dim": 1536,
    "vocos_num_layers": 8,
    "vocos_n_fft": 1024,
    "vocos_hop_length": 256,
    "sample_rate": OUTPUT_SAMPLE_RATE,
}


class ConditionalChatTTSConfig(PreTrainedConfig):
    """The TTS sub-config. Unknown keys are kept as attributes, missing ones take TTS_DEFAULTS."""

    model_type = "conditional_chattts"

    def __init__(self, **kwargs: Any) -> None:
        for key, value in TTS_DEFAULTS.items():
            kwargs.setdefault(key, value)
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in TTS_DEFAULTS}
        super().__init__(**kwargs)
        for key, value in own.items():
            setattr(self, key, value)


def _as_config(value: Any, cls: type[PreTrainedConfig], defaults: dict[str, Any] | None = None):
    if isinstance(value, cls):
        return value
    data = dict(defaults or {})
    if isinstance(value, PreTrainedConfig):
        value = value.to_dict()
    data.update(value or {})
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    return cls(**data)


# Reference class defaults for the vision tower that config.json leaves out (spec vision-llm §1.2).
VISION_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3}


class MiniCPMOConfig(Qwen2Config):
    """MiniCPM-o 2.6 configuration: the official ``config.json`` with ``model_type`` ``minicpmo``."""

    model_type = "minicpmo"
    sub_configs = {
        "vision_config": SiglipVisionConfig,
        "audio_config": WhisperConfig,
        "tts_config": ConditionalChatTTSConfig,
    }

    def __init__(
        self,
        vision_config: Any = None,
        audio_config: Any = None,
        tts_config: Any = None,
        **kwargs: Any,
    ) -> None:
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k in MULTIMODAL_DEFAULTS}
        super().__init__(**kwargs)
        for key, default in MULTIMODAL_DEFAULTS.items():
            setattr(self, key, extras.get(key, default))
        self.vision_config = _as_config(vision_config, SiglipVisionConfig, VISION_DEFAULTS)
        self.audio_config = _as_config(audio_config, WhisperConfig)
        self.tts_config = _as_config(tts_config, ConditionalChatTTSConfig)
        # As the reference: the top-level patch size follows the vision tower's.
        self.patch_size = self.vision_config.patch_size

    @property
    def max_slice_nums(self) -> int:
        return int((self.slice_config or {}).get("max_slice_nums", 9))


# Multimodal keys of the official config.json with their official values (spec vision-llm §1.1); the
# reference class defaults differ (drop_vision_last_layer=True, max_slice_nums=1) and are NOT used.
MULTIMODAL_DEFAULTS: dict[str, Any] = {
    "query_num": 64,
    "image_size": 448,
    "patch_size": 14,
    "drop_vision_last_layer": False,
    "batch_vision_input": True,
    "vision_batch_size": 16,
    "slice_mode": True,
    "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"},
    "use_image_id": True,
    "audio_pool_step": 2,
    "audio_chunk_length": 1.0,
    "chunk_input": True,
    "listen_speak_type": "asr",
    "version": 2.6,
    "init_vision": True,
    "init_audio": True,
    "init_tts": True,
    "stream_input": False,
}


# Last line on purpose: lets `import minicpmo_cli` finish registering the Auto classes (see __init__.py).
__import__("minicpmo_cli")._module_ready(__name__)
