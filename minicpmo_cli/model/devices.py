"""Which device and dtype a model runs on: the one place that decides, with one meaning of "auto".

"auto" is the best choice for this machine: CUDA when a GPU is usable (else the CPU); bfloat16 on GPUs that
run it natively (compute capability 8+, else float16), float32 on the CPU. The library (api.load) and the
guide-compatible ``MiniCPMO.from_pretrained`` both resolve through here; errors name the parameters
(``device``, ``dtype``), and the CLI says them as its flags.
"""

from __future__ import annotations

from typing import Callable

from minicpmo_cli.errors import EnvironmentProblem, ModelLoadError, UsageError

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = "auto, cpu, cuda or cuda:N"


def check_dtype_name(dtype) -> None:
    """A dtype name that is not one of DTYPES fails here, before any device is looked at."""
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}", parameters=("dtype",))


def resolve_device(device, warn: Callable[[str], None] | None = None) -> str:
    """auto (or None): CUDA when present, else the CPU (with a warning: the full model is slow there).

    Also takes what ``from_pretrained(device_map=...)`` accepts: a torch.device, a GPU index, or a dict
    mapping every module to one device.
    """
    import torch

    if isinstance(device, dict):
        devices = set(device.values())
        if len(devices) != 1:
            raise ModelLoadError("device_map with several devices is not supported; give one device")
        device = devices.pop()
    if isinstance(device, int):
        device = f"cuda:{device}"
    name = str(device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if warn is not None:
            warn("no CUDA GPU found: running on the CPU, which is slow for the full model")
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"device {name} asked for, but no CUDA GPU is usable here",
                                     parameters=("device",))
        index = name.split(":", 1)[1] if ":" in name else "0"
        if not index.isdigit():
            raise UsageError(f"device must be {DEVICES}, not {name!r}", parameters=("device",))
        if int(index) >= torch.cuda.device_count():
            raise EnvironmentProblem(f"device {name}: only {torch.cuda.device_count()} GPU(s) here",
                                     parameters=("device",))
        return name
    if name in ("cpu", "meta"):
        return name
    raise UsageError(f"device must be {DEVICES}, not {name!r}", parameters=("device",))


def resolve_dtype(dtype, device: str):
    """auto (or None): bfloat16 on GPUs that run it natively (else float16), float32 on the CPU.
    A torch.dtype or a name ("bfloat16", "torch.float16", ...) is taken as it is."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype_name(dtype)
    name = str(dtype or "auto").lower().removeprefix("torch.")
    if name != "auto":
        return getattr(torch, name)
    if str(device).startswith("cuda"):
        # Native bf16 needs compute capability 8 (Ampere+); is_bf16_supported() also says yes to the slow
        # emulated path of older GPUs, and looks at the current device rather than the chosen one.
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


# torch's own switches for its SDPA backend order (sdp_utils.cpp check_prefer_cudnn_attention, by version):
# a user who set either has chosen, and start_device leaves cuDNN attention as they said.
CUDNN_SDPA_SWITCHES = ("TORCH_CUDNN_SDPA_DEPRIORITIZED", "TORCH_CUDNN_SDPA_PREFERRED")


def start_device(device) -> str:
    """Start the device now, so that its cost is a start-up phase of its own; returns what was done.

    On CUDA: the context is created (the first allocation does it) and cuDNN attention is switched off for
    ``scaled_dot_product_attention``, unless the user chose with torch's own switches. Why: on Hopper and
    Blackwell (sm 9.x/10.x, cuDNN > 9.15) recent torch tries cuDNN attention first, and cuDNN builds an
    execution graph for every new problem shape (its cache key holds the key length) at tens of milliseconds of
    host time each. The eager decode loop attends over a key length that grows by one every token, so every
    token paid a graph build (and transformers' beam search the same); flash / memory-efficient attention
    have no per-shape build. The CPU needs nothing.
    """
    import os

    import torch

    if not str(device or "cpu").startswith("cuda"):
        return ""
    torch.empty(1, device=device)  # creates the CUDA context
    chosen = user_attention_choice(os.environ)
    if chosen is None:
        torch.backends.cuda.enable_cudnn_sdp(False)
        attention = "cuDNN attention off (a graph build per key length)"
    else:
        attention = f"cuDNN attention as {chosen}={os.environ[chosen]} says"
    return f"{torch.cuda.get_device_name(torch.device(device))}; {attention}"


def user_attention_choice(environ) -> str | None:
    """The torch switch (of CUDNN_SDPA_SWITCHES) the user set for cuDNN attention, or None: then it is ours."""
    return next((name for name in CUDNN_SDPA_SWITCHES if name in environ), None)
