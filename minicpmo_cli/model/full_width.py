"""A MiniCPM-o 2.6 checkpoint at the official widths but one layer per tower, random bf16 weights.

Every tensor has the official shape except that each tower is one (``layers``) deep: LLM hidden 3584,
intermediate 18,944, vocab 151,700, 28 query / 4 KV heads; SigLIP 1152 (16 heads, 4304), the resampler
over 3584; Whisper-medium 1024 (16 heads, 4096) and its 1024 -> 3584 projection; the ChatTTS Llama 768
(12 heads, 3072, 21,178 text tokens, 626 x 4 audio codes); the DVAE and Vocos as the reference hard-codes
them. It catches the shape bugs the tiny widths cannot (a 64-wide tower hides a wrong reshape of a head
dimension or a projection between towers), at ~3.1 GB on disk and in memory (bf16).

The tokenizers are the tiny checkpoint's (a 600-token BPE with every special token, the tiny ChatTTS one);
the rows of ``lm_head`` past the tokenizer are zero, so answers are (random) text rather than ids without
text, which would decode to nothing.
Also ``python -m minicpmo_cli.model.full_width OUT_DIR [LAYERS]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minicpmo_cli.model.tiny import (
    PREPROCESSOR_CONFIG,
    _write_json,
    _write_text_tokenizer,
    _write_tts_tokenizer,
    tiny_config_dict,
)

SHARD_BYTES = 1 << 30  # tensors are written ~1 GiB a file, so writing never holds the whole model twice
WEIGHT_STD = 0.02  # N(0, 0.02) matrices: with 0.05 (the tiny recipe) 3584-wide layers grow activations 3x


def full_width_config_dict(tokenizer_size: int, tts_ids: dict[str, int], layers: int = 1) -> dict:
    """config.json in the official layout: the official widths, ``layers`` layers in every tower."""
    config = tiny_config_dict(tokenizer_size, tts_ids)  # bos/eos ids of the stand-in tokenizer
    config.update({
        "_name_or_path": "minicpmo26_full_width_random", "torch_dtype": "bfloat16",
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": layers, "max_window_layers": layers,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151700,
        "max_position_embeddings": 32768, "sliding_window": 131072,
    })
    config["vision_config"] = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                               "model_type": "siglip_vision_model", "num_attention_heads": 16,
                               "num_hidden_layers": layers, "patch_size": 14}
    config["audio_config"] = {**config["audio_config"], "d_model": 1024, "encoder_layers": layers,
                              "encoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_layers": layers,
                              "decoder_attention_heads": 16, "decoder_ffn_dim": 4096, "num_hidden_layers": layers}
    # The TTS and DVAE/Vocos sizes not named here are the official defaults (model/config.py TTS_DEFAULTS).
    config["tts_config"] = {"model_type": "conditional_chattts", "llm_dim": 3584, "num_hidden_layers": layers,
                            "spk_emb_token_id": tts_ids["[spk_emb]"], "audio_bos_token_id": tts_ids["[Ptts]"],
                            "text_eos_token_id": tts_ids["[Etts]"]}
    return config


def _model_config(config_dict: dict):
    from minicpmo_cli.model.config import MiniCPMOConfig

    config = MiniCPMOConfig(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")})
    config._attn_implementation = "sdpa"
    return config


def _random_tensor(name: str, shape, generator):
    """The tiny recipe (model/tiny.py) at WEIGHT_STD, drawn directly in bf16 (no float32 copy of 1 GB tensors)."""
    import torch

    value = torch.empty(shape, dtype=torch.bfloat16)
    if name.endswith("coef") or name.endswith("original0"):
        return value.uniform_(0.5, 1.5, generator=generator)
    if len(shape) >= 2:
        return value.normal_(0.0, WEIGHT_STD, generator=generator)
    if "norm" in name and name.endswith("weight"):
        return value.normal_(1.0, 0.1, generator=generator)
    return value.normal_(0.0, 0.02, generator=generator)


def _write_weights(folder: Path, config_dict: dict, tokenizer_size: int, seed: int) -> None:
    """model-0000N.safetensors shards + the index, drawn tensor by tensor from the meta-built model's names."""
    import torch
    from safetensors.torch import save_file

    from minicpmo_cli.model.omni import MiniCPMOModel

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in MiniCPMOModel(_model_config(config_dict)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shards[0]})
        files.append(name)
        shards[0], sizes[0] = {}, 0

    for name in sorted(shapes):
        tensor = _random_tensor(name, shapes[name], generator)
        if name == "llm.lm_head.weight":
            tensor[tokenizer_size:] = 0  # logit 0 for ids without text: the random text logits win
        if sizes[0] and sizes[0] + tensor.nbytes > SHARD_BYTES:
            flush()
        shards[0][name] = tensor
        sizes[0] += tensor.nbytes
    flush()
    total = sum((folder / f).stat().st_size for f in files)
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_vocos(folder: Path, config_dict: dict, seed: int) -> None:
    """assets/Vocos.pt at the official sizes (float32, as the reference keeps it), tiny's recipe."""
    import torch

    from minicpmo_cli.model.tiny import _redraw_parameters
    from minicpmo_cli.model.vocoder import Vocos

    vocos = Vocos(_model_config(config_dict).tts_config)
    _redraw_parameters(vocos, seed)
    torch.save({k: v.detach().clone() for k, v in vocos.state_dict().items()}, str(folder / "assets" / "Vocos.pt"))


def make_full_width_checkpoint(out_dir: str | Path, layers: int = 1, seed: int = 0) -> Path:
    """Write the full-width checkpoint into ``out_dir`` (created if needed); returns the folder."""
    if layers < 1:
        raise ValueError(f"layers must be at least 1, not {layers}")
    folder = Path(out_dir)
    (folder / "assets").mkdir(parents=True, exist_ok=True)
    tokenizer_size = _write_text_tokenizer(folder)
    tts_ids = _write_tts_tokenizer(folder / "assets" / "chattts_tokenizer")
    config_dict = full_width_config_dict(tokenizer_size, tts_ids, layers)
    _write_json(folder / "config.json", config_dict)
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(folder / "generation_config.json",
                {"bos_token_id": config_dict["bos_token_id"], "eos_token_id": config_dict["eos_token_id"]})
    _write_weights(folder, config_dict, tokenizer_size, seed)
    _write_vocos(folder, config_dict, seed + 1)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m minicpmo_cli.model.full_width OUT_DIR [LAYERS]", file=sys.stderr)
        return 2
    print(make_full_width_checkpoint(args[0], layers=int(args[1]) if len(args) == 2 else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
