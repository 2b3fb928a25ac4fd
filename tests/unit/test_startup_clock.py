"""The start-up clock (minicpmo_cli/startup.py): phases in the order they end, parts of a span, first outputs."""

from __future__ import annotations

import time

import pytest

from minicpmo_cli.startup import StartupClock, process_age


def test_phases_end_in_order_with_parts_and_first_outputs_once():
    lines: list[str] = []
    clock = StartupClock(emit=lines.append)
    before = [p.name for p in clock.phases]
    time.sleep(0.02)
    clock.mark("imports", "torch")
    time.sleep(0.01)
    clock.mark("moved to the device", parts={"weights read": 0.005})
    clock.once("first answer text")
    clock.once("first answer text")
    names = [p.name for p in clock.phases][len(before):]
    assert names == ["imports", "weights read", "moved to the device", "first answer text"]
    assert clock.phases[len(before)].seconds >= 0.02
    assert [p.seconds for p in clock.phases if p.name == "weights read"] == [0.005]
    assert len(lines) == len(clock.phases) and lines[len(before)].startswith("startup: imports ")
    assert lines[len(before)].endswith("; torch")
    ats = [p.at for p in clock.phases]
    assert ats == sorted(ats)


def test_printing_starts_late_with_the_phases_recorded_so_far():
    clock = StartupClock()
    clock.mark("options and inputs")
    lines: list[str] = []
    clock.start_printing(lines.append)
    assert lines and lines[-1].startswith("startup: options and inputs ")
    clock.mark("imports")
    assert lines[-1].startswith("startup: imports ") and len(lines) == len(clock.phases)
    silent = StartupClock()
    silent.start_printing(None)
    silent.mark("imports")
    assert not silent.printing


@pytest.mark.skipif(process_age() is None, reason="no /proc here: the process's start time is unknown")
def test_the_first_phase_is_the_time_before_the_clock():
    clock = StartupClock()
    assert clock.phases[0].name == "python + cli start"
    assert clock.phases[0].seconds == pytest.approx(process_age(), abs=1.0)


def test_start_device_leaves_the_cpu_alone():
    import torch

    from minicpmo_cli.model.devices import start_device

    before = torch.backends.cuda.cudnn_sdp_enabled()
    assert start_device("cpu") == "" and start_device(None) == ""
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_users_own_cudnn_attention_switch_wins():
    from minicpmo_cli.model.devices import user_attention_choice

    assert user_attention_choice({}) is None
    assert user_attention_choice({"TORCH_CUDNN_SDPA_DEPRIORITIZED": "0"}) == "TORCH_CUDNN_SDPA_DEPRIORITIZED"
    assert user_attention_choice({"TORCH_CUDNN_SDPA_PREFERRED": "1"}) == "TORCH_CUDNN_SDPA_PREFERRED"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_start_device_on_cuda_turns_cudnn_attention_off(monkeypatch):
    import torch

    from minicpmo_cli.model.devices import CUDNN_SDPA_SWITCHES, start_device

    for name in CUDNN_SDPA_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        said = start_device("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.cuda.get_device_name(0) in said and "cuDNN attention off" in said
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
