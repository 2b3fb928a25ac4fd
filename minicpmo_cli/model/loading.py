"""Loading a checkpoint's safetensors by the official names, strictly (finding it: checkpoint_files.py).

The checkpoint files are used unchanged: parameter names and shapes are the official ones (spec vision-llm
§2). Every tensor of the checkpoint must land in a parameter (or persistent buffer) of the model and every
parameter must be filled, except the towers that were not built (``init_vision/init_audio/init_tts``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from minicpmo_cli.errors import ModelLoadError
from minicpmo_cli.model.checkpoint_files import weight_files

logger = logging.getLogger(__name__)

# Towers that may be left out, and the checkpoint prefixes that belong to them.
TOWER_PREFIXES = {
    "init_vision": ("vpm.", "resampler."),
    "init_audio": ("apm.", "audio_projection_layer."),
    "init_tts": ("tts.",),
}

# The TTS head_code weight norm arrives either as a parametrization or in the old weight_g/weight_v style.
_WEIGHT_NORM_ALIASES = (
    (".parametrizations.weight.original0", ".weight_g"),
    (".parametrizations.weight.original1", ".weight_v"),
)


def skipped_prefixes(config) -> tuple[str, ...]:
    """Checkpoint prefixes of the towers this config does not build."""
    prefixes: list[str] = []
    for flag, names in TOWER_PREFIXES.items():
        if not getattr(config, flag, True):
            prefixes.extend(names)
    return tuple(prefixes)


def _candidate_names(key: str) -> Iterator[str]:
    yield key
    for new, old in _WEIGHT_NORM_ALIASES:
        if key.endswith(old):
            yield key[: -len(old)] + new
        elif key.endswith(new):
            yield key[: -len(new)] + old


@dataclass
class LoadReport:
    loaded: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def raise_if_incomplete(self, where: object) -> None:
        problems = []
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape-mismatched", self.mismatched)):
            if names:
                shown = ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else "")
                problems.append(f"{len(names)} {label} tensors ({shown})")
        if problems:
            raise ModelLoadError("checkpoint does not fit the model: " + "; ".join(problems), where)


@dataclass
class _Slot:
    """Where one checkpoint tensor goes: a parameter/buffer (``leaf`` of ``module``) or a quantized linear."""

    name: str
    module: Any
    leaf: str
    entry: Any  # safetensors_reader.TensorEntry
    quantized: bool = False  # a piece of a quantized linear's weight (set when all its pieces are read)


def load_safetensors_into(module, files: Iterable[Path], skip_prefixes: tuple[str, ...] = (),
                          device=None, quantized: dict[str, Any] | None = None,
                          gptq=None, only_prefixes: tuple[str, ...] | None = None,
                          timings: dict[str, float] | None = None) -> LoadReport:
    """Fill every parameter/persistent buffer of ``module`` from the checkpoint files, tensor by tensor.

    Parameters still on the meta device are created on ``device`` in their own dtype, straight from the
    file (see safetensors_reader); real ones are copied into. ``quantized`` maps linear names to
    Int8Linear/Int4Linear modules: a float ``weight`` is quantized on the way, or, with ``gptq`` (the
    checkpoint's GptqConfig), the GPTQ tensors are checked and repacked. Tensors under ``skip_prefixes``
    (towers not built) are ignored, as is everything outside ``only_prefixes`` when given. Every file's
    header and every name and shape is checked before any data is read; the report says what did not fit.
    ``timings["read"]``: seconds spent reading the files (the rest of the time: converting and moving).
    """
    from minicpmo_cli.model import safetensors_reader as reader

    files = list(files)
    headers = [reader.read_header(f) for f in files]
    targets = _targets(module, only_prefixes)
    quantized = quantized or {}
    report = LoadReport()
    plan: list[_Slot] = []
    for header in headers:
        for key, entry in header.items():
            if key.startswith(skip_prefixes) or (only_prefixes is not None and not key.startswith(only_prefixes)):
                report.skipped += 1
                continue
            slot = _plan_quantized(key, entry, quantized, gptq, report) if quantized else None
            if slot is None and key not in report.unexpected:
                slot = _plan_plain(key, entry, targets, report)
            if slot is not None:
                plan.append(slot)
    planned = {s.name for s in plan}
    report.missing = sorted(set(targets) - planned) + _missing_quantized(quantized, gptq, planned)
    if not report.complete:
        return report
    _read_plan(plan, quantized, gptq, device, timings if timings is not None else {})
    report.loaded = planned
    return report


def _targets(module, only_prefixes) -> dict[str, tuple[Any, str, Any]]:
    """name -> (owning module, attribute name, tensor) for every parameter and persistent buffer."""
    targets: dict[str, tuple[Any, str, Any]] = {}
    for name, owner in module.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        for leaf, param in owner._parameters.items():
            if param is not None:
                targets[prefix + leaf] = (owner, leaf, param)
        for leaf, buf in owner._buffers.items():
            if buf is not None and leaf not in owner._non_persistent_buffers_set:
                targets[prefix + leaf] = (owner, leaf, buf)
    if only_prefixes is not None:
        targets = {k: v for k, v in targets.items() if k.startswith(only_prefixes)}
    return targets


def _plan_plain(key: str, entry, targets: dict, report: LoadReport) -> _Slot | None:
    name = next((n for n in _candidate_names(key) if n in targets), None)
    if name is None:
        report.unexpected.append(key)
        return None
    owner, leaf, target = targets[name]
    if tuple(entry.shape) != tuple(target.shape):
        report.mismatched.append(f"{key} {tuple(entry.shape)} vs {tuple(target.shape)}")
        return None
    return _Slot(name=name, module=owner, leaf=leaf, entry=entry)


def _plan_quantized(key: str, entry, quantized: dict, gptq, report: LoadReport) -> _Slot | None:
    """A slot for a quantized linear's weight (or GPTQ piece); None when ``key`` is not one of those."""
    from minicpmo_cli.model import quant_gptq

    prefix, _, piece = key.rpartition(".")
    linear = quantized.get(prefix)
    if linear is None or piece == "bias":
        return None
    pieces = quant_gptq.GPTQ_PIECES if gptq is not None else ("weight",)
    if piece not in pieces:
        report.unexpected.append(key)  # e.g. a float weight where the GPTQ tensors belong
        return None
    n, k = linear.out_features, linear.in_features
    if gptq is not None:
        quant_gptq.check_piece(gptq, prefix, piece, entry.shape, entry.dtype, k, n)
    elif tuple(entry.shape) != (n, k):
        report.mismatched.append(f"{key} {tuple(entry.shape)} vs {(n, k)}")
        return None
    return _Slot(name=key, module=linear, leaf=piece, entry=entry, quantized=True)


def _missing_quantized(quantized: dict, gptq, planned: set[str]) -> list[str]:
    from minicpmo_cli.model import quant_gptq

    required = quant_gptq.REQUIRED_PIECES if gptq is not None else ("weight",)
    return sorted(f"{p}.{r}" for p in quantized for r in required if f"{p}.{r}" not in planned)


def _read_plan(plan: list[_Slot], quantized: dict, gptq, device, timings: dict[str, float]) -> None:
    """Read the planned tensors, file by file in offset order, into their final place."""
    import torch

    from minicpmo_cli.model import safetensors_reader as reader

    pending: dict[str, dict[str, Any]] = {}
    staging = _Staging()
    reader = _TimedReader(reader, timings)
    expected: dict[str, set[str]] = {}
    for slot in plan:
        if slot.quantized:
            expected.setdefault(slot.name.rpartition(".")[0], set()).add(slot.leaf)
    by_file: dict[Path, list[_Slot]] = {}
    for slot in plan:
        by_file.setdefault(slot.entry.file, []).append(slot)
    with torch.no_grad():
        for file, slots in by_file.items():
            with reader.open_weights(file) as handle:
                for slot in sorted(slots, key=lambda s: s.entry.start):
                    prefix = slot.name.rpartition(".")[0]
                    if slot.quantized:
                        pieces = pending.setdefault(prefix, {})
                        if slot.leaf == "weight":  # a float weight to quantize: read into the reused buffer
                            pieces["weight"] = reader.read_into(handle, slot.entry, staging.view(slot.entry))
                        else:
                            pieces[slot.leaf] = reader.read_tensor(handle, slot.entry)
                        if set(pieces) == expected[prefix]:
                            _set_quantized(prefix, quantized[prefix], pending.pop(prefix), gptq, device)
                    else:
                        _place(handle, slot, device, reader)


class _Staging:
    """One CPU buffer, grown to the largest float weight to quantize and reused for each: a fresh tensor per
    weight would leave the allocator's heap fragmented between the (smaller) quantized results."""

    def __init__(self) -> None:
        self.buffer = None

    def view(self, entry):
        import math

        import torch

        nbytes = math.prod(entry.shape) * torch.empty((), dtype=entry.dtype).element_size()
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes].view(entry.dtype).view(entry.shape)


class _TimedReader:
    """safetensors_reader's ``read_into`` / ``read_tensor``, adding the seconds they take to ``timings["read"]``
    (the start-up clock's "weights read"; converting and moving to the device is the rest)."""

    def __init__(self, reader, timings: dict[str, float]) -> None:
        self.reader, self.timings = reader, timings

    def read_into(self, handle, entry, out):
        started = time.perf_counter()
        try:
            return self.reader.read_into(handle, entry, out)
        finally:
            self.timings["read"] = self.timings.get("read", 0.0) + time.perf_counter() - started

    def read_tensor(self, handle, entry):
        import torch

        return self.read_into(handle, entry, torch.empty(entry.shape, dtype=entry.dtype))

    def open_weights(self, path):
        return self.reader.open_weights(path)


def _place(handle, slot: _Slot, device, reader) -> None:
    """One tensor from the file into its parameter/buffer: in place when real, created when on meta."""
    import torch
    from torch import nn

    target = getattr(slot.module, slot.leaf)
    entry = slot.entry
    if target.device.type != "meta":
        staged = reader.read_tensor(handle, entry)
        target.data.copy_(staged.to(dtype=target.dtype))
        return
    final_device = torch.device(device or "cpu")
    if final_device.type == "cpu" and entry.dtype == target.dtype:
        value = reader.read_into(handle, entry, torch.empty(entry.shape, dtype=entry.dtype))
    else:  # one staging tensor, converted/moved into the final one
        value = reader.read_tensor(handle, entry).to(device=final_device, dtype=target.dtype)
    if isinstance(target, nn.Parameter):
        slot.module._parameters[slot.leaf] = nn.Parameter(value, requires_grad=target.requires_grad)
    else:
        slot.module._buffers[slot.leaf] = value


def _set_quantized(prefix: str, linear, pieces: dict, gptq, device) -> None:
    """A quantized linear's weight from its checkpoint tensors, quantized or repacked on its device."""
    from minicpmo_cli.model import quant, quant_gptq

    pieces = {k: v.to(device or "cpu") for k, v in pieces.items()}
    if gptq is not None:
        q, scales, zeros, group = quant_gptq.to_int4(gptq, prefix, pieces, linear.in_features, linear.out_features)
        linear.set_weight(q, scales, zeros, group)
    elif hasattr(linear, "packed"):
        q, scales, zeros = quant.quantize_int4(pieces["weight"], quant.INT4_GROUP_SIZE)
        linear.set_weight(q, scales, zeros, quant.INT4_GROUP_SIZE)
    else:
        linear.set_weight(*quant.quantize_int8(pieces["weight"]))


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters go to the meta device as they are registered (no memory); buffers stay real.

    Buffers such as the RoPE ``inv_freq`` tables and the DVAE levels are computed in ``__init__`` and are
    not in the checkpoint, so they must be real; parameters are created by the loader from the file.
    """
    from torch import nn

    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def construction_context(dtype=None, device=None):
    """Build modules fast: no random init (weights come from the checkpoint), params in ``dtype`` on ``device``."""
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_init_weights())
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def build_and_load(cls, config, folder: Path, dtype, device, quantize: str | None = None, clock=None):
    """``cls(config)`` with parameters on meta, its decoder linears quantized as asked (or as the GPTQ
    checkpoint is), then filled from the checkpoint straight into ``device``/``dtype``: peak memory is the
    final size plus one tensor. The result's ``quantization`` says what it holds (quant.QuantizationInfo).
    ``clock`` (minicpmo_cli/startup.py) marks the device start, the construction, the reading and the move.
    """
    from minicpmo_cli.model import quant, quant_gptq
    from minicpmo_cli.model.devices import start_device
    from minicpmo_cli.startup import mark

    gptq = quant_gptq.read_gptq_config(folder)
    mode, source = quant.quantization_mode(quantize, gptq, folder)
    mark(clock, "device start", start_device(device))
    with construction_context(dtype=dtype, device=device), parameters_on_meta():
        model = cls(config)
    mark(clock, "model built", "modules made, parameters not yet filled")
    quantized = {}
    if mode != "none":
        names = quant.decoder_linear_names(config.num_hidden_layers)
        quantized = quant.replace_linears(model, names, mode, dtype or _default_dtype())
    timings: dict[str, float] = {}
    report = load_safetensors_into(model, weight_files(folder), skipped_prefixes(config), device=device,
                                   quantized=quantized, gptq=gptq, timings=timings)
    report.raise_if_incomplete(folder)
    if clock is not None and str(device or "cpu").startswith("cuda"):
        _synchronize(device)  # the conversions queued on the GPU count as moving, not as what comes next
    mark(clock, f"moved to the device ({device or 'cpu'})", f"{mode} weights" if mode != "none" else "",
         parts={"weights read": timings.get("read", 0.0)})
    if mode != "none":
        _return_freed_heap()
    model.quantization = quant.summarize(model, mode, source)
    if mode != "none" and "dequantize" in model.quantization.kernel and str(device or "cpu").startswith("cuda"):
        logger.warning("%s: %s", mode, model.quantization.kernel_reason + "; dequantizing in forward (slower)")
    return model


def _synchronize(device) -> None:
    import torch

    torch.cuda.synchronize(device)


def _return_freed_heap() -> None:
    """Hand the quantizer's freed temporaries back to the OS (glibc keeps them in its heap otherwise)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _default_dtype():
    import torch

    return torch.get_default_dtype()


TOWER_FLAGS = {"vision": "init_vision", "audio": "init_audio", "tts": "init_tts"}
TOWER_BUILDERS = {"vision": "_build_vision", "audio": "_build_audio", "tts": "_build_tts"}


def attach_towers(model, towers: Iterable[str], device, dtype) -> None:
    """Build the named towers ("vision", "audio", "tts") into a model loaded without them and fill them from
    the checkpoint (only their tensors are read), on the model's device and dtype."""
    towers = [t for t in towers if not getattr(model.config, TOWER_FLAGS[t])]
    if not towers:
        return
    prefixes = tuple(p for t in towers for p in TOWER_PREFIXES[TOWER_FLAGS[t]])
    with construction_context(dtype=dtype, device=device), parameters_on_meta():
        for tower in towers:
            getattr(model, TOWER_BUILDERS[tower])()
    folder = Path(model.config._name_or_path)
    report = load_safetensors_into(model, weight_files(folder), device=device, only_prefixes=prefixes)
    report.raise_if_incomplete(folder)
    for tower in towers:
        setattr(model.config, TOWER_FLAGS[tower], True)
    model.eval()
