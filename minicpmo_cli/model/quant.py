"""Weight-only quantization of the LLM's decoder linears: which modules, how, and what the user got.

Only the 7 linears of every Qwen2 decoder layer (q/k/v/o, gate/up/down) are quantized, as in the official
int4 checkpoint; embeddings, lm_head, norms and the vision/audio/TTS towers keep the model's dtype.

- ``int8``: symmetric, one scale per output row: ``q = round(w / s)``, ``s = max|w| / 127``.
- ``int4``: round-to-nearest in groups of 128 input columns, asymmetric min/max in torch's int4 convention
  ``w = (q - 8) * s + zero`` (``s = (max - min) / 15``, ``zero = min + 8 s``).
- the official GPTQ int4 checkpoint: see quant_gptq.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minicpmo_cli.model.quant_linear import Int4Linear, Int8Linear

MODES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 128
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Values quantized at a time: bounds the float temporaries to a few MB whatever the weight's size.
_CHUNK_VALUES = 2**20


def _row_slices(weight: torch.Tensor):
    rows = max(16, _CHUNK_VALUES // max(1, weight.shape[1]) // 16 * 16)
    return weight.split(rows)


def check_mode(value: str | None) -> str | None:
    """``none|int8|int4`` (any case) or None (= as the checkpoint is); anything else is a ValueError."""
    if value is None:
        return None
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, not {value!r}")
    return mode


def decoder_linear_names(num_layers: int, prefix: str = "llm.model.layers") -> list[str]:
    return [f"{prefix}.{i}.{name}" for i in range(num_layers) for name in DECODER_LINEARS]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 scales [N]) with ``w ≈ q * scale[:, None]``."""
    qs, scales = [], []
    for rows in _row_slices(weight):
        rows = rows.float()
        scale = rows.abs().amax(dim=1).clamp(min=1e-8) / 127
        qs.append(torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(qs), torch.cat(scales)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE):
    """float [N, K] -> (uint8 values 0..15 [N, K], scales [N, G], zeros [N, G]) in torch's convention."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    qs, scales, zeros = [], [], []
    for rows in _row_slices(weight):
        groups = rows.float().reshape(rows.shape[0], k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = (high - low).clamp(min=1e-8) / 15
        zero = low + 8 * scale
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15)
        qs.append(q.to(torch.uint8).reshape(rows.shape[0], k))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(qs), torch.cat(scales), torch.cat(zeros)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight of :func:`quantize_int4`'s output (float32)."""
    n, k = q.shape
    groups = q.float().reshape(n, scales.shape[1], -1) - 8
    return (groups * scales[..., None].float() + zeros[..., None].float()).reshape(n, k)


def replace_linears(model: nn.Module, names: list[str], mode: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Swap the named ``nn.Linear`` modules for empty Int8Linear/Int4Linear ones; returns them by name."""
    cls = {"int8": Int8Linear, "int4": Int4Linear}[mode]
    swapped: dict[str, nn.Module] = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not a Linear")
        device = old.weight.device
        new = cls(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype, device=device)
        setattr(parent, leaf, new)
        swapped[name] = new
    return swapped


@dataclass
class QuantizationInfo:
    """What the loaded model holds, for doctor and -v: mode, where it came from, kernel and why, memory."""

    mode: str  # none | int8 | int4
    source: str  # "" (none), "--quantize" or "GPTQ checkpoint"
    linears: int = 0
    kernel: str = ""
    kernel_reason: str = ""
    weight_bytes: int = 0  # every parameter and buffer of the loaded model

    def describe(self) -> str:
        size = self.weight_bytes
        memory = f"weights {size / 2**30:.2f} GiB" if size >= 2**30 else f"weights {size / 2**20:.1f} MiB"
        if self.mode == "none":
            return f"quantization none (full precision), {memory}"
        return (f"quantization {self.mode} ({self.source}) on {self.linears} LLM linears, "
                f"kernel {self.kernel}: {self.kernel_reason}; {memory}")


def summarize(model: nn.Module, mode: str, source: str) -> QuantizationInfo:
    quantized = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    kernels = sorted({(m.kernel, m.kernel_reason) for m in quantized})
    kernel = ", ".join(k for k, _ in kernels)
    reason = "; ".join(r for _, r in kernels)
    return QuantizationInfo(mode=mode, source=source, linears=len(quantized), kernel=kernel,
                            kernel_reason=reason, weight_bytes=model_bytes(model))


def model_bytes(model: nn.Module) -> int:
    """Bytes held by every parameter and buffer (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor is None or id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def quantization_mode(quantize: str | None, gptq, folder: Path) -> tuple[str, str]:
    """(mode, source): what ``--quantize`` asks for, checked against what the checkpoint is."""
    from minicpmo_cli.errors import UsageError

    try:
        asked = check_mode(quantize)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if gptq is not None:
        if asked not in (None, "int4"):
            raise UsageError(f"--quantize {asked}: {folder} is a GPTQ int4 checkpoint, which loads as int4 "
                             "(leave --quantize out, or give int4)")
        return "int4", "GPTQ checkpoint"
    if asked in (None, "none"):
        return "none", ""
    return asked, "--quantize"


def quantization_preview(folder: Path, quantize: str | None, device: str, dtype) -> str:
    """What loading ``folder`` would give, without loading it (for doctor): the mode and where it comes from,
    the kernel chosen on ``device`` and why, and the weights' memory, estimated from the file headers."""
    from minicpmo_cli.model import quant_gptq, quant_linear
    from minicpmo_cli.model.checkpoint_files import weight_files
    from minicpmo_cli.model.safetensors_reader import read_header

    gptq = quant_gptq.read_gptq_config(folder)
    mode, source = quantization_mode(quantize, gptq, folder)
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for file in weight_files(folder):
        for name, entry in read_header(file).items():
            numel = max(1, entry.end - entry.start) // entry.dtype.itemsize
            prefix, _, leaf = name.rpartition(".")
            linear = prefix.startswith("llm.model.layers.") and prefix.endswith(DECODER_LINEARS)
            if linear and mode == "int8" and leaf == "weight":
                total += numel + entry.shape[0] * size
            elif linear and mode == "int4" and leaf == "weight":
                total += numel // 2 + numel // INT4_GROUP_SIZE * 2 * size
            elif linear and gptq is not None and leaf in ("qweight", "scales"):
                total += numel * (4 if leaf == "qweight" else 2 * size)
            elif entry.dtype.is_floating_point and leaf not in ("g_idx", "qzeros"):
                total += numel * size
    memory = f"weights about {total / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')}"
    if mode == "none":
        return f"none (full precision); {memory}"
    if mode == "int8":
        kernel = "int8pack-cpu" if device == "cpu" else "int8-cast"
        reason = ("torch's CPU int8 kernel, bfloat16 inputs" if device == "cpu"
                  else "int8 weight cast to the activation dtype")
    else:
        kernel, reason = quant_linear.int4_kernel_for(torch.device(device), dtype, 4096, 4096, 128)
        reason += ", bfloat16 inputs" if kernel == "int4pack-cpu" else ""
    return f"{mode} ({source}), kernel {kernel}: {reason}; {memory}"
