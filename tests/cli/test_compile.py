"""``--compile`` on the CPU: the captured decode step (torch.compile, Inductor) gives the same ids as eager.

Compiling costs about a minute or two on two CPU cores, so there are only two compiled decodes here, both
with the tiniest shapes (batch 1, a 256-position bucket); the second one reuses Inductor's on-disk cache.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli_process

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.2", "--max-new-tokens", "6"]


def run_cli(*args, env_extra: dict | None = None):
    """A fresh process each time: compiling twice in one process would reuse the first capture."""
    return run_cli_process(*args, env=env_extra, timeout=900)


@pytest.mark.slow
def test_compile_flag_answers_as_eager_and_logs_the_warm_up(tiny_ckpt):
    common = ["--model", tiny_ckpt, "--device", "cpu", "--dtype", "float32", "-v"]
    eager = run_cli(*common, "--no-compile", "chat", "hello there", *GREEDY)
    compiled = run_cli(*common, "--compile", "chat", "hello there", *GREEDY)
    assert eager.code == 0, eager.stderr
    assert compiled.code == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.strip()
    assert "compiled the decode step for batch 1" in compiled.stderr
    assert "compiled the decode step" not in eager.stderr
    from_env = run_cli(*common, "chat", "hello there", *GREEDY, env_extra={"MINICPMO_COMPILE": "0"})
    assert from_env.stdout == eager.stdout and "compiled the decode step" not in from_env.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", ["stock", "modules"])
def test_compiled_ids_equal_eager_ids(tiny_ckpt, path, monkeypatch):
    """Both captured steps: the CPU's over plain tensors (nested compile regions) and the module-based one
    (CUDA's, and any model with layers of other kinds, e.g. int8/int4 linears)."""
    from minicpmo_cli import api
    from minicpmo_cli.generation import forward
    from minicpmo_cli.generation.decode import DecodeSettings, generate_ids

    if path == "modules":
        monkeypatch.setattr(forward, "stock_weights", lambda llm: None)

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu", dtype="float32"), tts=False)
    inputs = engine.processor.apply_chat_template(msgs=[{"role": "user", "content": "hello there"}])
    with torch.inference_mode():
        embeds, _ = engine.model.get_inputs_embeds(dict(inputs))
    settings = DecodeSettings.from_kwargs({"repetition_penalty": 1.2}, 6, [1])
    eager = generate_ids(engine.model.llm, embeds, None, settings)
    taken = []
    real_step = forward.compiled_step
    monkeypatch.setattr(forward, "compiled_step", lambda device, stock: taken.append(stock) or real_step(device, stock))
    assert generate_ids(engine.model.llm, embeds, None, settings, compile=True) == eager
    assert taken and set(taken) == {path == "stock"}


def test_compile_default_follows_the_device_and_the_environment(monkeypatch):
    from minicpmo_cli.generation.decode import resolve_compile

    monkeypatch.delenv("MINICPMO_COMPILE", raising=False)
    assert resolve_compile(None, "cpu") is False and resolve_compile(None, "cuda") is True
    assert resolve_compile(True, "cpu") is True and resolve_compile(False, "cuda") is False
    monkeypatch.setenv("MINICPMO_COMPILE", "1")
    assert resolve_compile(None, "cpu") is True
    monkeypatch.setenv("MINICPMO_COMPILE", "off")
    assert resolve_compile(None, "cuda") is False
