"""The quantized linears against the plain formulas they stand for: torch's int4/int8 CPU kernels, the
dequantize fallback, kernel-group splitting, round-to-nearest quantizers and the GPTQ -> torch conversion."""

from __future__ import annotations

import pytest
import torch

from minicpmo_cli.model import quant, quant_gptq
from minicpmo_cli.model.quant_linear import Int4Linear, Int8Linear, pack_nibbles, unpack_nibbles

# fp32 activations: the kernels accumulate in fp32, so only summation order differs from the float matmul.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def torch_int4_weight(q, scales, zeros):
    """torch's convention, written out: w = (q - 8) * scale + zero per group."""
    n, k = q.shape
    group = k // scales.shape[1]
    return ((q.float() - 8).view(n, -1, group) * scales[..., None] + zeros[..., None]).view(n, k)


def random_int4(n, k, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, groups, generator=g) * 0.05 + 0.01
    zeros = torch.randn(n, groups, generator=g) * 0.05
    return q, scales, zeros


@pytest.mark.parametrize("n,k,group,kernel", [
    (64, 256, 128, "int4pack-cpu"),
    (64, 512, 512, "int4pack-cpu"),   # one group over all inputs (GPTQ -1): split into kernel groups of 256
    (48, 384, 384, "int4pack-cpu"),   # 384 = 3 x 128
    (24, 128, 64, "dequantize"),      # 24 outputs: not a multiple of 16, the CPU kernel refuses
    (32, 96, 96, "int4pack-cpu"),     # 96 = 3 x 32
    (528, 64, 64, "int4pack-cpu"),    # packed in slices of PACK_ROWS rows (3 slices, the last one short)
])
def test_int4_linear_matches_its_formula(n, k, group, kernel):
    q, scales, zeros = random_int4(n, k, k // group)
    linear = Int4Linear(k, n, bias=True, dtype=torch.float32)
    linear.cpu_compute_dtype = torch.float32  # the formula exactly (the default feeds the kernel bf16)
    linear.bias.data = torch.randn(n)
    linear.set_weight(q, scales, zeros, group)
    assert linear.kernel == kernel
    x = torch.randn(2, 3, k)
    expected = x @ torch_int4_weight(q, scales, zeros).t() + linear.bias
    torch.testing.assert_close(linear(x), expected, **FP32_TOL)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_default_cpu_kernels_take_bf16_inputs_and_stay_close(model_dtype):
    """The default CPU path (bf16 inputs, the kernels' fast path): within 2 % of the float result."""
    q, scales, zeros = random_int4(64, 256, 2)
    linear = Int4Linear(256, 64, bias=False, dtype=model_dtype)
    linear.set_weight(q, scales, zeros, 128)
    assert linear.compute_dtype == torch.bfloat16 and "bfloat16 inputs" in linear.kernel_reason
    x = torch.randn(4, 256)
    expected = x @ torch_int4_weight(q, scales, zeros).t()
    got = linear(x.to(model_dtype))
    assert got.dtype == model_dtype
    assert (got.float() - expected).abs().max() < 0.02 * expected.abs().max()
    w = torch.randn(48, 96)
    q8, s8 = quant.quantize_int8(w)
    int8 = Int8Linear(96, 48, bias=False, dtype=model_dtype)
    int8.set_weight(q8, s8)
    expected = x[:, :96] @ (q8.float() * s8[:, None]).t()
    got = int8(x[:, :96].to(model_dtype)).float()
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (8, 32))
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q.to(torch.uint8))


def test_dequantize_layout_gives_the_weight_back():
    q, scales, zeros = random_int4(24, 128, 2)
    linear = Int4Linear(128, 24, bias=False, dtype=torch.float32)
    linear.set_weight(q, scales, zeros, 64)
    torch.testing.assert_close(linear.dequantized_weight(), torch_int4_weight(q, scales, zeros))


def test_round_to_nearest_int4_error_is_at_most_half_a_step():
    w = torch.randn(32, 256)
    q, scales, zeros = quant.quantize_int4(w, 128)
    assert q.min() >= 0 and q.max() <= 15 and scales.shape == (32, 2)
    err = (quant.dequantize_int4(q, scales, zeros) - w).abs().view(32, 2, 128)
    assert bool((err <= scales[..., None] / 2 + 1e-6).all())


def test_int8_linear_matches_its_formula():
    w = torch.randn(48, 96)
    q, scales = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert (q.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6
    linear = Int8Linear(96, 48, bias=False, dtype=torch.float32)
    linear.cpu_compute_dtype = torch.float32  # the formula exactly (the default feeds the kernel bf16)
    linear.set_weight(q, scales)
    assert linear.kernel == "int8pack-cpu"
    x = torch.randn(5, 96)
    torch.testing.assert_close(linear(x), x @ (q.float() * scales[:, None]).t(), **FP32_TOL)


def pack_gptq_columns(values):
    """[8R, C] values 0..15 -> int32 [R, C], 8 nibbles along dim 0, low first (the qweight layout)."""
    v = values.long().view(-1, 8, values.shape[1])
    packed = sum(v[:, i] << (4 * i) for i in range(8))
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)


def test_gptq_zero_point_conversion_is_exact_for_any_zero():
    """s * (q - z) == (q - 8) * s + zero with zero = (8 - z) * s: torch's int4 form of GPTQ's weight."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (16, 64), generator=g).float()
    z = torch.randint(1, 16, (16, 1), generator=g).float()
    s = torch.rand(16, 1, generator=g)
    gptq_weight = s * (q - z)
    torch.testing.assert_close((q - 8) * s + quant_gptq.torch_zero_points(z, s), gptq_weight)


def test_gptq_tensors_run_on_the_int4_kernel_as_their_formula():
    n, k = 64, 256
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 16, (k, n), generator=g)  # [in, out], as GPTQ stores it
    config = quant_gptq.GptqConfig(bits=4, group_size=-1, desc_act=True, sym=True, source=None)
    pieces = {
        "qweight": pack_gptq_columns(values),
        "qzeros": torch.full((1, n // 8), 0x77777777, dtype=torch.int32),  # zero 8, stored as 7
        "scales": (torch.rand(1, n, generator=g) * 0.02).half(),
        "g_idx": torch.zeros(k, dtype=torch.int32),
    }
    reference = pieces["scales"].float() * (values.float() - 8)  # scales[o] * (q[i, o] - (qzeros[o] + 1))
    torch.testing.assert_close(quant_gptq.dequantize(config, pieces, k), reference.t())
    linear = Int4Linear(k, n, bias=False, dtype=torch.float32)
    linear.cpu_compute_dtype = torch.float32  # the formula exactly (the default feeds the kernel bf16)
    linear.set_weight(*quant_gptq.to_int4(config, "layer", pieces, k, n))
    x = torch.randn(3, k)
    torch.testing.assert_close(linear(x), x @ reference, **FP32_TOL)
