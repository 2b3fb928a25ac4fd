"""The step mode (``--step eager|graph|compile``, ``MINICPMO_STEP``; ``--compile`` / ``--no-compile`` as
aliases): resolved once at load; ``compile`` on the CPU (Inductor) gives eager's ids; ``graph`` needs a CUDA
GPU (a one-line refusal elsewhere) and there gives eager's ids bit for bit.

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
    from_env = run_cli(*common, "chat", "hello there", *GREEDY, env_extra={"MINICPMO_STEP": "eager"})
    assert from_env.stdout == eager.stdout and "compiled the decode step" not in from_env.stderr


@pytest.mark.slow
def test_compiled_ids_equal_eager_ids(tiny_ckpt):
    from minicpmo_cli import api
    from minicpmo_cli.generation.decode import DecodeSettings, generate_ids
    from minicpmo_cli.generation.engine import LLMEngine
    from minicpmo_cli.generation.step_runner import StepRunner

    engine = api.load(api.LoadOptions(model=str(tiny_ckpt), device="cpu", dtype="float32", step="eager"),
                      tts=False)
    assert engine.step_mode == "eager" and engine.llm_engine.runner.mode == "eager"
    inputs = engine.processor.apply_chat_template(msgs=[{"role": "user", "content": "hello there"}])
    with torch.inference_mode():
        embeds, _ = engine.model.get_inputs_embeds(dict(inputs))
    settings = DecodeSettings.from_kwargs({"repetition_penalty": 1.2}, 6, [1])
    eager = generate_ids(engine.model.llm, embeds, None, settings, engine=engine.llm_engine)
    runner = StepRunner("compile")
    compiled = LLMEngine(engine.model.llm, runner=runner, threaded=False)
    assert generate_ids(engine.model.llm, embeds, None, settings, engine=compiled) == eager
    assert runner._compiled  # the step ran compiled


def test_step_default_follows_the_device_and_the_environment(monkeypatch):
    from minicpmo_cli.errors import UsageError
    from minicpmo_cli.generation.step_runner import resolve_step

    monkeypatch.delenv("MINICPMO_STEP", raising=False)
    monkeypatch.delenv("MINICPMO_COMPILE", raising=False)
    assert resolve_step(None, "cpu") == "trace" and resolve_step(None, "cuda") == "graph"
    assert resolve_step("compile", "cpu") == "compile" and resolve_step("eager", "cuda") == "eager"
    monkeypatch.setenv("MINICPMO_COMPILE", "1")
    assert resolve_step(None, "cpu") == "compile"
    monkeypatch.setenv("MINICPMO_COMPILE", "off")
    assert resolve_step(None, "cuda") == "eager"
    monkeypatch.setenv("MINICPMO_STEP", "compile")
    assert resolve_step(None, "cuda") == "compile"
    with pytest.raises(UsageError, match="graph needs a CUDA GPU"):
        resolve_step("graph", "cpu")
    with pytest.raises(UsageError, match="one of eager, trace, graph, compile"):
        resolve_step("fast", "cpu")


def test_compile_aliases_map_to_step_modes():
    from minicpmo_cli.api.engine import LoadOptions, step_mode

    assert step_mode(LoadOptions(compile=True), "cpu") == "compile"
    assert step_mode(LoadOptions(compile=False), "cuda") == "eager"
    assert step_mode(LoadOptions(step="eager", compile=True), "cpu") == "eager"  # --step wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: graphs are allowed here")
def test_step_graph_without_cuda_is_a_one_line_usage_error(tiny_ckpt):
    result = run_cli("--model", tiny_ckpt, "--device", "cpu", "--step", "graph", "chat", "hi", *GREEDY)
    lines = result.stderr.strip().splitlines()
    assert result.code == 2, result.stderr
    assert len(lines) == 1 and "--step graph needs a CUDA GPU" in lines[0] and "Traceback" not in result.stderr
    bad = run_cli("--model", tiny_ckpt, "--device", "cpu", "--step", "fast", "chat", "hi", *GREEDY)
    assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--step must be one of" in bad.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_ids_and_logits_equal_eager_on_cuda(tiny_ckpt, dtype):
    """On CUDA eager runs the same fixed-shape step a graph captures: logits bit for bit, ids exactly, for a
    batch whose rows join at different steps."""
    from minicpmo_cli import MiniCPMO
    from minicpmo_cli.generation.decode import DecodeSettings, split_rows
    from minicpmo_cli.generation.engine import LLMEngine, Request
    from minicpmo_cli.generation.step_runner import StepRunner

    model = MiniCPMO.from_pretrained(str(tiny_ckpt), dtype=dtype).to("cuda")
    msgs = [[{"role": "user", "content": text}] for text in ("hello there", "tell me a story", "hi")]
    inputs = model.processor.apply_chat_template(msgs=msgs).to("cuda")
    with torch.inference_mode():
        embeds, _ = model.get_inputs_embeds(dict(inputs))
    rows = split_rows(embeds, inputs["attention_mask"])
    settings = DecodeSettings(max_new_tokens=24)

    def run(mode):
        runner = StepRunner(mode)
        engine = LLMEngine(model.llm, runner=runner, threaded=False)
        logits = []
        real = runner.run
        runner.run = lambda *a: logits.append(real(*a)) or logits[-1]
        first = [engine.submit(Request(row, settings)) for row in rows[:2]]
        for _ in range(3):
            engine.step()
        late = engine.submit(Request(rows[2], settings))
        return [h.result() for h in [*first, late]], logits, runner

    eager, eager_logits, _ = run("eager")
    graph, graph_logits, runner = run("graph")
    assert graph == eager and runner.captured
    assert len(graph_logits) == len(eager_logits)
    assert all(torch.equal(a, b) for a, b in zip(eager_logits, graph_logits))


def test_compile_caches_live_in_minicpmos_folder_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from minicpmo_cli.generation import step_runner

    monkeypatch.setenv("MINICPMO_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes there on import
    step_runner._use_compile_cache()
    assert step_runner.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
    assert (tmp_path / "compile").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    step_runner._use_compile_cache()
    assert step_runner.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
