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
