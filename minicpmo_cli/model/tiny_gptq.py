"""A tiny checkpoint in exactly the layout of the official GPTQ int4 one (``openbmb/MiniCPM-o-2_6-int4``).

``make_tiny_gptq_checkpoint(out_dir)`` writes a tiny random checkpoint (tiny.py) and replaces the weight of
every LLM decoder linear (q/k/v/o, gate/up/down) by its GPTQ tensors, quantized by round-to-nearest:
symmetric 4-bit, ``group_size -1`` (one scale per output channel), zero 8 stored as 7, ``g_idx`` all zeros,
fp16 scales; everything else is kept (or cast to ``other_dtype``, e.g. bfloat16 as the official file).
``quantize_config.json`` is AutoGPTQ's. Also ``python -m minicpmo_cli.model.tiny_gptq OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minicpmo_cli.model.quant import DECODER_LINEARS

QUANTIZE_CONFIG = {
    "bits": 4, "group_size": -1, "damp_percent": 0.01, "desc_act": True, "static_groups": False, "sym": True,
    "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None, "quant_method": "gptq",
    "checkpoint_format": "gptq",
}


def gptq_quantize(weight):
    """float [out, in] -> GPTQ tensors (qweight, qzeros, scales, g_idx) by symmetric round-to-nearest."""
    import torch

    out_features, in_features = weight.shape
    w = weight.float().t()  # [in, out]
    scales = (2 * w.abs().amax(dim=0, keepdim=True) / 15).clamp(min=1e-8)  # [1, out]: GPTQ's sym range
    values = torch.clamp(torch.round(w / scales) + 8, 0, 15).long()  # [in, out]
    return {
        "qweight": _pack(values.view(in_features // 8, 8, out_features), dim=1),
        "qzeros": _pack(torch.full((1, out_features // 8, 8), 7, dtype=torch.long), dim=2),
        "scales": scales.half(),
        "g_idx": torch.zeros(in_features, dtype=torch.int32),
    }


def _pack(nibbles, dim: int):
    """Sum nibble i << 4i along ``dim`` (low nibble first) into int32, wrapping as two's complement."""
    import torch

    shifts = (torch.arange(8) * 4).view([8 if d == dim else 1 for d in range(nibbles.ndim)])
    packed = (nibbles << shifts).sum(dim=dim)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)


def is_quantized_weight(name: str) -> bool:
    return name.startswith("llm.model.layers.") and name.endswith(tuple(f"{n}.weight" for n in DECODER_LINEARS))


def convert_to_gptq(folder: Path, other_dtype=None) -> None:
    """Rewrite ``folder/model.safetensors`` in the GPTQ layout and add quantize_config.json."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    out = {}
    for name, tensor in state.items():
        if is_quantized_weight(name):
            prefix = name.removesuffix(".weight")
            out.update({f"{prefix}.{k}": v for k, v in gptq_quantize(tensor).items()})
        else:
            out[name] = tensor if other_dtype is None or not tensor.is_floating_point() else tensor.to(other_dtype)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "quantize_config.json").write_text(json.dumps(QUANTIZE_CONFIG, indent=2) + "\n")


def make_tiny_gptq_checkpoint(out_dir: str | Path, seed: int = 0, other_dtype=None) -> Path:
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(out_dir, seed=seed)
    convert_to_gptq(folder, other_dtype)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m minicpmo_cli.model.tiny_gptq OUT_DIR", file=sys.stderr)
        return 2
    print(make_tiny_gptq_checkpoint(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
