"""Weight-only quantized linears on torch's own kernels: int4 (tinygemm layout) and int8 (per output channel).

int4 follows torch's convention for ``_weight_int4pack_mm``: per group of ``group_size`` input columns,
``w = (q - 8) * scale + zero`` with ``q`` in 0..15 and ``zero`` a float offset. The kernels accept groups of
32, 64, 128 or 256 columns only; a wider group (e.g. GPTQ's ``group_size -1``, one group per output row) is
split into equal kernel groups that carry the same scale and zero, which is exact.

Kernels (chosen once, when the weight is set, and recorded in ``kernel`` / ``kernel_reason``):
- CPU: ``_weight_int4pack_mm_for_cpu`` (int32 values -> ``_convert_weight_to_int4pack_for_cpu``) and
  ``torch._weight_int8pack_mm``, both fed bfloat16 inputs whatever the model's dtype: that is their fast
  path (measured on a 3584x3584 linear, one token, one thread: int4 6 ms and int8 1.9 ms with bfloat16
  inputs, 131 ms and 63 ms with float32 ones, against 15.6 ms for the float32 matmul);
- CUDA with compute capability >= 8.0 and bfloat16 activations: ``_weight_int4pack_mm`` (uint8 nibbles ->
  ``_convert_weight_to_int4pack`` with 8 inner k-tiles); int8 multiplies by the int8 weight cast to the
  activation dtype, then scales (memory saving; the weight stays int8 between calls);
- anything else (older GPUs: torch's own capability check does not fire there, shapes the kernels refuse):
  ``dequantize`` - the weight is expanded to the activation dtype inside forward.

The packed layouts are device-specific: these modules are built on their final device and not moved.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
CUDA_INNER_K_TILES = 8
# The CPU packing is row by row, so it runs on slices of rows (a multiple of 16): its int32 input then stays
# a slice, not a copy of the whole weight at 4 bytes per value.
PACK_ROWS = 256


def kernel_group_size(group_size: int) -> int | None:
    """The largest group the int4 kernels accept that divides ``group_size`` (None: none does)."""
    return next((g for g in KERNEL_GROUP_SIZES if group_size % g == 0), None)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [N, K] -> uint8 [N, K/2], column 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [N, K/2] -> uint8 values 0..15 [N, K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def cuda_int4_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether torch's CUDA int4 kernel can run here, and why (not)."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 (the int4 kernel needs Ampere or newer)"
    if dtype != torch.bfloat16:
        return False, f"the CUDA int4 kernel needs bfloat16 activations, not {str(dtype).removeprefix('torch.')}"
    return True, f"compute capability {major}.{minor}, bfloat16"


def int4_kernel_for(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                    group_size: int) -> tuple[str, str]:
    """(kernel, reason) for an int4 weight of [out_features, in_features] on ``device`` with ``dtype`` inputs."""
    if kernel_group_size(group_size) is None:
        return "dequantize", f"group size {group_size} is not a multiple of 32"
    if device.type == "cpu":
        if out_features % 16:
            return "dequantize", f"out_features {out_features} is not a multiple of 16"
        return "int4pack-cpu", "torch's CPU int4 kernel"
    if device.type == "cuda":
        ok, why = cuda_int4_support(device, dtype)
        if not ok:
            return "dequantize", why
        if out_features % 8 or in_features % (CUDA_INNER_K_TILES * 16):
            return "dequantize", f"shape [{out_features}, {in_features}] does not fit the CUDA int4 tiles"
        return "int4pack-cuda", f"torch's CUDA int4 kernel ({why})"
    return "dequantize", f"no int4 kernel for {device.type}"


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as 4-bit values, a scale and a zero per group (see module doc)."""

    cpu_compute_dtype = torch.bfloat16  # the CPU kernel's inputs (tests set float32 to check formulas exactly)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = 0  # kernel group size, set with the weight
        self.kernel = self.kernel_reason = ""
        self.dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.empty(out_features, dtype=self.dtype, device=device)) if bias else None
        # Not part of state_dict: they are device-specific layouts rebuilt at every load.
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scales_and_zeros", None, persistent=False)

    def set_weight(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        """Take values ``q`` (0..15, [N, K]) with ``scales``/``zeros`` ([N, K / group_size]) on the final device."""
        n, k = self.out_features, self.in_features
        if tuple(q.shape) != (n, k) or k % group_size or tuple(scales.shape) != (n, k // group_size):
            raise ValueError(f"int4 weight {tuple(q.shape)} / scales {tuple(scales.shape)} do not fit [{n}, {k}]")
        device = q.device
        self.kernel, self.kernel_reason = int4_kernel_for(device, self.dtype, n, k, group_size)
        self.compute_dtype = {"int4pack-cpu": self.cpu_compute_dtype, "int4pack-cuda": torch.bfloat16}.get(
            self.kernel, self.dtype)
        if self.kernel == "int4pack-cpu":
            self.kernel_reason += f", {str(self.compute_dtype).removeprefix('torch.')} inputs"
        step = kernel_group_size(group_size) or group_size
        repeat = group_size // step
        scales, zeros = scales.repeat_interleave(repeat, dim=1), zeros.repeat_interleave(repeat, dim=1)
        self.group_size = step
        # [K / g, N, 2]: the kernels' layout of the per-group (scale, zero) pairs.
        self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(
            self.compute_dtype)
        if self.kernel == "int4pack-cpu":
            self.packed = torch.empty(n, k // 2, dtype=torch.uint8)
            for start in range(0, n, PACK_ROWS):
                rows = q[start:start + PACK_ROWS].to(torch.int32).contiguous()
                self.packed[start:start + PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
        elif self.kernel == "int4pack-cuda":
            # The CUDA kernel wants the high nibble first, the opposite of pack_nibbles.
            q8 = q.to(torch.uint8)
            nibbles = (q8[:, 0::2] << 4 | q8[:, 1::2]).contiguous()
            self.packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, CUDA_INNER_K_TILES)
        else:
            self.packed = pack_nibbles(q).contiguous()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as floats (only for the dequantize kernel's layout; tests compare the kernels against this)."""
        if self.kernel != "dequantize":
            raise RuntimeError(f"the {self.kernel} layout is opaque; dequantized_weight needs the dequantize kernel")
        q = unpack_nibbles(self.packed).to(dtype or self.dtype)
        groups = q.view(self.out_features, -1, self.group_size) - 8
        scales, zeros = self.scales_and_zeros.to(q.dtype).transpose(0, 1).unbind(-1)
        return (groups * scales[..., None] + zeros[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int4pack-cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.compute_dtype).contiguous(), self.packed,
                                                            self.group_size, self.scales_and_zeros)
        elif self.kernel == "int4pack-cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed,
                                                   self.group_size, self.scales_and_zeros)
        else:
            y = F.linear(x2, self.dequantized_weight(x2.dtype))
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros, self.bias)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel or 'unset'}")


class Int8Linear(nn.Module):
    """``y = (x @ Q.T) * scale + b`` with Q int8 [N, K] and one scale per output row (symmetric)."""

    cpu_compute_dtype = torch.bfloat16  # the CPU kernel's inputs (see the module doc)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = self.kernel_reason = ""
        self.dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.empty(out_features, dtype=self.dtype, device=device)) if bias else None
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)

    def set_weight(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features) or tuple(scales.shape) != (self.out_features,):
            raise ValueError(f"int8 weight {tuple(q.shape)} / scales {tuple(scales.shape)} do not fit")
        self.qweight = q.to(torch.int8).contiguous()
        if q.device.type == "cpu":
            self.compute_dtype = self.cpu_compute_dtype
            self.kernel = "int8pack-cpu"
            self.kernel_reason = (f"torch's CPU int8 kernel (_weight_int8pack_mm), "
                                  f"{str(self.compute_dtype).removeprefix('torch.')} inputs")
        else:
            self.compute_dtype = self.dtype
            self.kernel, self.kernel_reason = "int8-cast", "int8 weight cast to the activation dtype per call"
        self.scales = scales.to(self.compute_dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "int8pack-cpu":
            y = torch._weight_int8pack_mm(x2.to(self.compute_dtype).contiguous(), self.qweight, self.scales)
        else:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel or 'unset'}"
