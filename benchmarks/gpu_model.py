"""The full-size MiniCPM-o 2.6 with random weights for the GPU benchmarks: built on meta, filled on the device.

No checkpoint is downloaded: the model is built from the official config.json with parameters on the meta
device, then each tower is materialised on the device (``to_empty``) and filled with random numbers (the
buffers computed in ``__init__``, RoPE tables and DVAE levels, are kept). Used by gpu_full_size.py and
gpu_profile.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REFERENCE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "config.json"  # beside the repo

# The official openbmb/MiniCPM-o-2_6 config.json, minus keys no module reads (Whisper decoder-only
# generation settings such as suppress_tokens), for machines without /work/shared.
OFFICIAL_CONFIG: dict[str, Any] = {
    "_name_or_path": "openbmb/MiniCPM-o-2_6", "model_type": "minicpmo", "version": 2.6,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151700, "batch_vision_input": True, "drop_vision_last_layer": False,
    "image_size": 448, "audio_chunk_length": 1.0, "audio_pool_step": 2, "chunk_input": True,
    "listen_speak_type": "asr", "patch_size": 14, "query_num": 64,
    "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv"}, "slice_mode": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_image_id": True, "vision_batch_size": 16,
    "audio_config": {
        "_name_or_path": "openai/whisper-medium", "model_type": "whisper", "d_model": 1024,
        "encoder_attention_heads": 16, "encoder_ffn_dim": 4096, "encoder_layers": 24,
        "decoder_attention_heads": 16, "decoder_ffn_dim": 4096, "decoder_layers": 24, "num_hidden_layers": 24,
        "max_source_positions": 1500, "num_mel_bins": 80, "torch_dtype": "float32",
    },
    "tts_config": {"model_type": "conditional_chattts", "llm_dim": 3584},
    "vision_config": {
        "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
    },
}


# ------------------------------------------------------------------------------------------ building
def load_config_dict(args) -> tuple[dict, str]:
    if args.config:
        return json.loads(Path(args.config).read_text()), args.config
    if REFERENCE_CONFIG.exists():
        return json.loads(REFERENCE_CONFIG.read_text()), str(REFERENCE_CONFIG)
    return dict(OFFICIAL_CONFIG), "embedded copy of the official config.json"


def make_config(config_dict: dict, tts_tokenizer_ids: dict[str, int], attn: str):
    """MiniCPMOConfig with the TTS special ids of the stand-in tokenizer (the sizes stay the official ones)."""
    from minicpmo_cli.model.config import MiniCPMOConfig

    values = {k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")}
    values["tts_config"] = {**values.get("tts_config", {}), **tts_tokenizer_ids}
    config = MiniCPMOConfig(**values)
    config._attn_implementation = attn
    return config


def build_on_meta(config, dtype):
    """(MiniCPMO with every tower, Vocos in float32 as the reference), parameters on meta."""
    import torch

    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.model.loading import construction_context, parameters_on_meta
    from minicpmo_cli.model.vocoder import Vocos

    config.init_vision = config.init_audio = config.init_tts = True
    with construction_context(dtype=dtype), parameters_on_meta():
        model = MiniCPMO(config)
    with construction_context(dtype=torch.float32), parameters_on_meta():
        vocos = Vocos(config.tts_config)
    return model.eval(), vocos.eval()


def towers(model, vocos) -> list[tuple[str, Any]]:
    return [(name, child) for name, child in model.named_children()] + [("vocos", vocos)]


def random_fill(module, generator) -> None:
    """Well-scaled random weights: N(0, 0.02) matrices, unit norm gains, zero biases, positive WN gains."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("coef", "original0", "weight_g")):
                param.uniform_(0.5, 1.5, generator=generator)
            elif param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def materialise(module, device: str, generator) -> None:
    """``to_empty`` on ``device``, the CPU-computed buffers put back, random parameters."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    module.to_empty(device=device)
    for name, buf in module.named_buffers():
        buf.copy_(saved[name])
    random_fill(module, generator)




def tiny_ids(tiny_dir: Path) -> tuple[dict, dict[str, int]]:
    """(the tiny checkpoint's config.json, the ChatTTS special ids its stand-in tokenizer uses)."""
    tiny_config = json.loads((tiny_dir / "config.json").read_text())
    ids = {k: tiny_config["tts_config"][k] for k in ("spk_emb_token_id", "audio_bos_token_id", "text_eos_token_id")}
    return tiny_config, ids
