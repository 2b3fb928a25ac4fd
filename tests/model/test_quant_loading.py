"""Loading quantized models: the official GPTQ int4 layout (a tiny checkpoint written in it), --quantize
int8/int4 on a float checkpoint, and strict errors for malformed quantized checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpmo_cli.errors import ModelLoadError, UsageError
from minicpmo_cli.generation.guide import MiniCPMO
from minicpmo_cli.model import quant, quant_gptq
from minicpmo_cli.model.quant_linear import Int4Linear, Int8Linear
from minicpmo_cli.model.tiny_gptq import convert_to_gptq

IDS = torch.tensor([[5, 17, 42, 99, 230, 7, 311, 64]])
# Logits of the quantized model against the same model with the dequantized weights in float32. The CPU
# kernels take bfloat16 inputs (their fast path, see quant_linear.py), so the stated tolerance is 2 % of the
# largest logit (measured: 0.9 % on the tiny GPTQ checkpoint; the unquantized model is 30 % away).
LOGIT_TOL = 0.02


def assert_logits_close(got, reference):
    bound = LOGIT_TOL * float(reference.abs().max())
    assert float((got - reference).abs().max()) <= bound
    return bound
Q_PROJ = "llm.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def gptq_ckpt(tiny_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gptq") / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    convert_to_gptq(folder)
    return folder


def load(folder, **kwargs):
    return MiniCPMO.from_pretrained(str(folder), device_map="cpu", dtype=torch.float32, load_processor=False,
                                    init_vision=False, init_audio=False, init_tts=False, **kwargs)


def logits(model):
    with torch.inference_mode():
        return model.llm(input_ids=IDS).logits


def with_weights(folder, weights: dict):
    """The float model of ``folder`` with the named decoder linears' weights replaced."""
    model = load(folder)
    with torch.no_grad():
        for name, weight in weights.items():
            model.get_submodule(name).weight.copy_(weight)
    return model


def linear_names(model):
    return quant.decoder_linear_names(model.config.num_hidden_layers)


def test_official_int4_layout_loads_natively(tiny_ckpt, gptq_ckpt):
    model = load(gptq_ckpt)
    info = model.quantization
    assert (info.mode, info.source, info.linears, info.kernel) == ("int4", "GPTQ checkpoint", 14, "int4pack-cpu")
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in linear_names(model))
    assert isinstance(model.llm.lm_head, torch.nn.Linear)
    config = quant_gptq.read_gptq_config(gptq_ckpt)
    state = load_file(str(gptq_ckpt / "model.safetensors"))
    dequantized = {}
    for name in linear_names(model):
        pieces = {p: state[f"{name}.{p}"] for p in quant_gptq.GPTQ_PIECES}
        dequantized[name] = quant_gptq.dequantize(config, pieces, model.get_submodule(name).in_features)
    reference = logits(with_weights(tiny_ckpt, dequantized))
    bound = assert_logits_close(logits(model), reference)
    # and it is really quantized: the float model's logits are much further away
    assert float((logits(load(tiny_ckpt)) - logits(model)).abs().max()) > 5 * bound


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_option_matches_the_dequantized_model(tiny_ckpt, mode):
    model = load(tiny_ckpt, quantize=mode)
    cls = Int8Linear if mode == "int8" else Int4Linear
    assert model.quantization.mode == mode and model.quantization.source == "--quantize"
    assert all(isinstance(model.get_submodule(n), cls) for n in linear_names(model))
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    dequantized = {}
    for name in linear_names(model):
        w = state[f"{name}.weight"]
        if mode == "int8":
            q, scales = quant.quantize_int8(w)
            dequantized[name] = q.float() * scales[:, None]
        else:
            dequantized[name] = quant.dequantize_int4(*quant.quantize_int4(w, quant.INT4_GROUP_SIZE))
    assert_logits_close(logits(model), logits(with_weights(tiny_ckpt, dequantized)))


def test_quantized_weights_take_less_memory(tiny_ckpt):
    sizes = {mode: sum(m.weight_bytes() for m in load(tiny_ckpt, quantize=mode).modules()
                       if isinstance(m, (Int4Linear, Int8Linear))) for mode in ("int8", "int4")}
    model = load(tiny_ckpt)
    full = sum(model.get_submodule(n).weight.numel() * 4 for n in linear_names(model))
    assert sizes["int8"] < full / 3 and sizes["int4"] < full / 6


def test_quantize_none_is_the_plain_model(tiny_ckpt):
    model = load(tiny_ckpt, quantize="none")
    assert model.quantization.mode == "none"
    torch.testing.assert_close(logits(model), logits(load(tiny_ckpt)), atol=0, rtol=0)


def test_gptq_checkpoint_refuses_another_mode(gptq_ckpt):
    with pytest.raises(UsageError, match="GPTQ int4 checkpoint"):
        load(gptq_ckpt, quantize="int8")
    with pytest.raises(UsageError, match="--quantize must be one of"):
        load(gptq_ckpt, quantize="int3")


# ------------------------------------------------------------------------------------ malformed checkpoints
@pytest.fixture
def broken_gptq(gptq_ckpt, tmp_path):
    """``broken_gptq(edit_state=None, edit_config=None) -> folder``: a copy of the GPTQ checkpoint, edited."""
    def make(edit_state=None, edit_config=None):
        folder = tmp_path / "broken"
        shutil.copytree(gptq_ckpt, folder)
        if edit_state is not None:
            state = load_file(str(folder / "model.safetensors"))
            edit_state(state)
            save_file(state, str(folder / "model.safetensors"))
        if edit_config is not None:
            path = folder / "quantize_config.json"
            config = json.loads(path.read_text())
            edit_config(config)
            path.write_text(json.dumps(config))
        return folder
    return make


def test_missing_qzeros_is_named(broken_gptq):
    folder = broken_gptq(edit_state=lambda s: s.pop(f"{Q_PROJ}.qzeros"))
    with pytest.raises(ModelLoadError, match=rf"missing.*{Q_PROJ}\.qzeros"):
        load(folder)


def test_wrong_shape_is_named(broken_gptq):
    def edit(state):
        state[f"{Q_PROJ}.scales"] = state[f"{Q_PROJ}.scales"][:, :64].contiguous()
    with pytest.raises(ModelLoadError, match=rf"{Q_PROJ}\.scales: shape \[1, 64\] does not fit"):
        load(broken_gptq(edit_state=edit))


def test_asymmetric_zeros_are_named(broken_gptq):
    def edit(state):
        state[f"{Q_PROJ}.qzeros"][0, 3] = 0x77777778
    with pytest.raises(ModelLoadError, match=rf"{Q_PROJ}\.qzeros: asymmetric zero points \[9\]"):
        load(broken_gptq(edit_state=edit))


def test_act_order_g_idx_is_named(broken_gptq):
    def edit(state):
        state[f"{Q_PROJ}.g_idx"][5] = 1
    with pytest.raises(ModelLoadError, match=rf"{Q_PROJ}\.g_idx: g_idx is not in input order"):
        load(broken_gptq(edit_state=edit))


def test_float_weight_in_place_of_gptq_tensors(broken_gptq, tiny_ckpt):
    def edit(state):
        for piece in quant_gptq.GPTQ_PIECES:
            state.pop(f"{Q_PROJ}.{piece}")
        state[f"{Q_PROJ}.weight"] = load_file(str(tiny_ckpt / "model.safetensors"))[f"{Q_PROJ}.weight"]
    with pytest.raises(ModelLoadError, match=rf"unexpected tensors \({Q_PROJ}\.weight\)"):
        load(broken_gptq(edit_state=edit))


@pytest.mark.parametrize("key,value,message", [
    ("bits", 8, "bits 8 is not supported"),
    ("group_size", 100, "group_size 100 is not supported"),
    ("sym", False, "sym false"),
    ("checkpoint_format", "gptq_v2", "checkpoint_format 'gptq_v2' is not supported"),
    ("quant_method", "awq", "quant_method 'awq' is not supported"),
])
def test_unsupported_quantize_config_is_named(broken_gptq, key, value, message):
    folder = broken_gptq(edit_config=lambda c: c.update({key: value}))
    with pytest.raises(ModelLoadError, match=rf"quantize_config.json: {message}"):
        load(folder)
