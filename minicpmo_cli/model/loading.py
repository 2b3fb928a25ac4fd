"""Finding a checkpoint (folder or hub id) and loading its safetensors by the official names, strictly.

The checkpoint files are used unchanged: parameter names and shapes are the official ones (spec vision-llm
§2). Every tensor of the checkpoint must land in a parameter (or persistent buffer) of the model and every
parameter must be filled, except the towers that were not built (``init_vision/init_audio/init_tts``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from minicpmo_cli.errors import HubUnavailable, ModelLoadError

# What a hub snapshot needs: configs, tokenizer files, weights and the TTS assets (no remote code, no demo
# media from the assets folder).
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "merges.txt",
    "vocab.txt",
    "*.model",
    "assets/Vocos.pt",
    "assets/chattts_tokenizer/*",
]
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

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


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local folder as is; otherwise a hub id resolved through huggingface_hub's cache.

    ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) uses only what is already cached.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError("expected a checkpoint folder, got a file", path)
    name = str(name_or_path)
    if means_local_folder(name):
        raise ModelLoadError("no such checkpoint folder (and not a hub id of the form owner/name)", name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id=name,
            revision=revision,
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=bool(local_files_only),
            cache_dir=None if cache_dir is None else str(cache_dir),
            token=token,
        )
    except LocalEntryNotFoundError as exc:
        if local_files_only or _hub_offline():
            reason = "not in the local Hugging Face cache, and downloading is off (--offline / HF_HUB_OFFLINE)"
        else:
            reason = "not in the local Hugging Face cache, and the hub cannot be reached to download it"
        # No network (or offline) is the environment, not the checkpoint: exit 4, and say the way around it.
        raise HubUnavailable(f"{reason}; download it elsewhere (hf download {name} --local-dir DIR) and "
                             "pass --model DIR, or use --offline once it is cached", name) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot download from the Hugging Face hub: {exc}", name) from exc
    return Path(folder)


def means_local_folder(name: str) -> bool:
    """True when ``name`` can only be a local path: ./x, /x, ~/x, a bare name or a/b/c, or a/b where the
    folder a exists here (then a hub id owner/name is not what was meant)."""
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return True
    return Path(name).parent.is_dir()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = folder / WEIGHTS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelLoadError(f"weight shards listed in {WEIGHTS_INDEX} are missing: {', '.join(absent)}", folder)
        return files
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError("no model.safetensors (or shards) in the checkpoint folder", folder)
    return files


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

    def raise_if_incomplete(self, where: object) -> None:
        problems = []
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape-mismatched", self.mismatched)):
            if names:
                shown = ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else "")
                problems.append(f"{len(names)} {label} tensors ({shown})")
        if problems:
            raise ModelLoadError("checkpoint does not fit the model: " + "; ".join(problems), where)


def load_safetensors_into(module, files: Iterable[Path], skip_prefixes: tuple[str, ...] = ()) -> LoadReport:
    """Copy every checkpoint tensor into the parameter/persistent buffer of the same name (cast to its dtype).

    Tensors under ``skip_prefixes`` (towers not built) are ignored. Returns a report; nothing is raised here.
    """
    import torch
    from safetensors import safe_open

    targets = module.state_dict(keep_vars=True)
    report = LoadReport()
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if key.startswith(skip_prefixes):
                        report.skipped += 1
                        continue
                    name = next((n for n in _candidate_names(key) if n in targets), None)
                    if name is None:
                        report.unexpected.append(key)
                        continue
                    tensor = handle.get_tensor(key)
                    target = targets[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        report.mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(target.shape)}")
                        continue
                    target.data.copy_(tensor.to(dtype=target.dtype))
                    report.loaded.add(name)
    report.missing = sorted(set(targets) - report.loaded)
    return report


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


def resolve_dtype(dtype):
    """``torch.dtype``, a name ("bfloat16", "float16", "float32"), "auto" or None -> torch.dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}")
    return value


def resolve_device(device_map) -> str | None:
    """device_map as accepted by our loader: None/"cpu"/"cuda"/"cuda:1"/torch.device/int, or "auto"."""
    import torch

    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ModelLoadError("device_map with several devices is not supported; give one device")
        device_map = devices.pop()
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    if str(device_map) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device_map)
