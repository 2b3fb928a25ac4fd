"""The tiny checkpoint with other LLM sizes: wide enough for memory measurements, or deep and narrow.

``make_resized_checkpoint(out_dir, hidden_size=..., num_hidden_layers=...)`` writes the tiny checkpoint
(tiny.py: tokenizers, assets, tiny vision/audio/TTS towers) with the LLM resized, random N(0, 0.02)
weights (norm gains 1) in ``dtype``. Used by the loading-memory test and benchmarks/quant.py.
"""

from __future__ import annotations

import json
from pathlib import Path


def make_resized_checkpoint(out_dir: str | Path, *, hidden_size: int = 1024, intermediate_size: int = 2816,
                            num_hidden_layers: int = 6, num_attention_heads: int = 8,
                            num_key_value_heads: int = 2, dtype: str = "float32", seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    from minicpmo_cli.model.config import MiniCPMOConfig
    from minicpmo_cli.model.loading import construction_context, parameters_on_meta
    from minicpmo_cli.model.omni import MiniCPMOModel
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(out_dir, seed=seed)
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    data.update(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                max_window_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads, torch_dtype=dtype)
    data["tts_config"]["llm_dim"] = hidden_size
    config_path.write_text(json.dumps(data, indent=2) + "\n")
    config = MiniCPMOConfig(**{k: v for k, v in data.items() if k not in ("auto_map", "architectures")})
    config._attn_implementation = "sdpa"
    with construction_context(dtype=torch.float32), parameters_on_meta():
        model = MiniCPMOModel(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name and name.endswith("weight"):
            value = torch.ones(tensor.shape)
        elif name.endswith(("coef", "original0", "weight_g")):
            value = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif tensor.is_floating_point():
            value = 0.02 * torch.randn(tensor.shape, generator=generator)
        else:
            value = torch.zeros(tensor.shape, dtype=tensor.dtype)
        state[name] = value.to(getattr(torch, dtype) if value.is_floating_point() else value.dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
