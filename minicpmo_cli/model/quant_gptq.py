"""The official GPTQ int4 checkpoint (``openbmb/MiniCPM-o-2_6-int4``): its layout, strict checks, repacking.

Per quantized linear with ``in`` inputs and ``out`` outputs (AutoGPTQ's ``gptq`` checkpoint format):
``qweight`` int32 [in/8, out] (8 nibbles along the input dim, low nibble first), ``qzeros`` int32
[groups, out/8] (nibbles along the output dim, storing zero - 1), ``scales`` [groups, out], ``g_idx`` int32
[in] (group of each input column), ``bias`` where the linear has one. The weight is
``scales[g, o] * (q[i, o] - (qzeros[g, o] + 1))`` with ``g = g_idx[i]``.

Torch's int4 kernels use ``w = (q - 8) * scale + zero`` per group; with GPTQ's zero point z that is
``zero = (8 - z) * scale`` (exact; 0 for the symmetric zero 8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minicpmo_cli.errors import ModelLoadError

QUANTIZE_CONFIG = "quantize_config.json"
GPTQ_PIECES = ("qweight", "qzeros", "scales", "g_idx")
REQUIRED_PIECES = ("qweight", "qzeros", "scales")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class GptqConfig:
    bits: int
    group_size: int  # -1: one group spans all inputs
    desc_act: bool
    sym: bool
    source: Path  # the file it was read from, for messages

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_of(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def read_gptq_config(folder: Path) -> GptqConfig | None:
    """The checkpoint's GPTQ settings (quantize_config.json, or config.json's quantization_config), checked.

    None for a checkpoint that is not quantized. Anything this loader cannot run exactly is a ModelLoadError
    naming the file and the key.
    """
    path = folder / QUANTIZE_CONFIG
    if path.exists():
        data = _read_json(path)
    else:
        path = folder / "config.json"
        data = (_read_json(path) if path.exists() else {}).get("quantization_config")
        if not data:
            return None
    method = str(data.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ModelLoadError(f"quant_method {method!r} is not supported (only GPTQ int4)", path)
    fmt = str(data.get("checkpoint_format", "gptq")).lower()
    if fmt != "gptq":
        raise ModelLoadError(f"checkpoint_format {fmt!r} is not supported (only 'gptq')", path)
    bits, group_size = data.get("bits"), data.get("group_size", -1)
    if bits != 4:
        raise ModelLoadError(f"bits {bits!r} is not supported (only 4-bit GPTQ)", path)
    if not isinstance(group_size, int) or not (group_size == -1 or (group_size > 0 and group_size % 32 == 0)):
        raise ModelLoadError(f"group_size {group_size!r} is not supported (-1 or a multiple of 32)", path)
    if data.get("sym", True) is not True:
        raise ModelLoadError("sym false (asymmetric zero points) is not supported; only symmetric GPTQ", path)
    return GptqConfig(bits=4, group_size=group_size, desc_act=bool(data.get("desc_act", False)),
                      sym=True, source=path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read it as JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise ModelLoadError("expected a JSON object", path)
    return data


def expected_shapes(config: GptqConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    groups = config.groups(in_features)
    return {"qweight": (in_features // 8, out_features), "qzeros": (groups, out_features // 8),
            "scales": (groups, out_features), "g_idx": (in_features,)}


def check_piece(config: GptqConfig, name: str, piece: str, shape: tuple[int, ...], dtype: torch.dtype,
                in_features: int, out_features: int) -> None:
    """One tensor's shape and dtype against the layout, before any data is read."""
    if in_features % 8 or out_features % 8 or (config.group_size != -1 and in_features % config.group_size):
        raise ModelLoadError(f"[{out_features}, {in_features}] cannot be GPTQ-packed with group_size "
                             f"{config.group_size}", name)
    want = expected_shapes(config, in_features, out_features)[piece]
    if tuple(shape) != want:
        raise ModelLoadError(f"shape {list(shape)} does not fit a GPTQ int4 layout for [{out_features}, "
                             f"{in_features}] (expected {list(want)})", f"{name}.{piece}")
    integer = piece != "scales"
    if integer and dtype != torch.int32:
        raise ModelLoadError(f"dtype {str(dtype).removeprefix('torch.')} (expected int32)", f"{name}.{piece}")
    if not integer and not dtype.is_floating_point:
        raise ModelLoadError(f"dtype {str(dtype).removeprefix('torch.')} (expected floats)", f"{name}.{piece}")


def unpack_columns(packed: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """int32 [R, C] with 8 nibbles per element, low first, along dim 0 -> values 0..15 [8R, C] in ``dtype``.

    Unpacked a slice of rows at a time: the int32 shifts then never span the whole weight.
    """
    out = torch.empty(packed.shape[0] * 8, packed.shape[1], dtype=dtype, device=packed.device)
    shifts = _SHIFTS.to(packed.device)[None, :, None]
    step = max(1, 2**17 // max(1, packed.shape[1]))
    for start in range(0, packed.shape[0], step):
        rows = packed[start:start + step]
        out[start * 8:(start + rows.shape[0]) * 8] = ((rows.unsqueeze(1) >> shifts) & 15).reshape(-1, rows.shape[1])
    return out


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with 8 nibbles per element, low first, along dim 1 -> int32 values 0..15 [R, 8C]."""
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 15
    return nibbles.reshape(packed.shape[0], -1)


def to_int4(config: GptqConfig, name: str, pieces: dict[str, torch.Tensor], in_features: int,
            out_features: int):
    """GPTQ tensors -> (values 0..15 [out, in], scales [out, G], zeros [out, G], group size) for Int4Linear."""
    missing = [p for p in REQUIRED_PIECES if p not in pieces]
    if missing:
        raise ModelLoadError(f"missing from the GPTQ checkpoint ({', '.join(missing)} of this linear)",
                             f"{name}.{missing[0]}")
    group = config.group_of(in_features)
    if "g_idx" in pieces:
        expected = torch.arange(in_features, device=pieces["g_idx"].device, dtype=torch.int32) // group
        if not torch.equal(pieces["g_idx"].to(torch.int32), expected):
            raise ModelLoadError("g_idx is not in input order (act-order groups are not supported)",
                                 f"{name}.g_idx")
    zeros = unpack_rows(pieces["qzeros"]) + 1  # the gptq format stores zero - 1
    if not bool((zeros == 8).all()):
        bad = sorted(set(zeros.unique().tolist()) - {8})[:4]
        raise ModelLoadError(f"asymmetric zero points {bad} (sym is true: every zero must be 8, stored as 7)",
                             f"{name}.qzeros")
    q = unpack_columns(pieces["qweight"], torch.uint8).t()  # [out, in]
    scales = pieces["scales"].float().t().contiguous()  # [out, G]
    return q, scales, torch_zero_points(zeros.t(), scales), group


def torch_zero_points(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """GPTQ zero points z ([out, G]) -> torch int4 float zeros: s * (q - z) = (q - 8) * s + (8 - z) * s."""
    return (8 - zeros.float()) * scales.float()


def dequantize(config: GptqConfig, pieces: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """The float32 weight [out, in] of a GPTQ linear, straight from the format's formula (for tests and tools)."""
    q = unpack_columns(pieces["qweight"]).float()  # [in, out]
    zeros = unpack_rows(pieces["qzeros"]).float() + 1  # [G, out]
    g_idx = pieces.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_features) // config.group_of(in_features)
    g_idx = g_idx.long()
    return (pieces["scales"].float()[g_idx] * (q - zeros[g_idx])).t().contiguous()
