"""`minicpmo doctor`: what this machine has, what is missing, and how to fix it. Always exits 0."""

from __future__ import annotations

import importlib
import platform
import shutil
import sys
from pathlib import Path

import typer

from minicpmo_cli.cli import common

FIXES = {
    "torch": "pip install torch (CPU: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
    "transformers": "pip install 'transformers>=5,<6'",
    "av": "pip install av",
    "soundfile": "pip install soundfile",
    "librosa": "pip install librosa",
}


def _version_of(module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a broken install is reported as missing
        return None
    return str(getattr(module, "__version__", "installed"))


def _gpu_lines() -> list[tuple[str, str]]:
    try:
        import torch
    except Exception:  # noqa: BLE001
        return [("CUDA", "unknown (torch missing)")]
    if not torch.cuda.is_available():
        return [("CUDA", "not available: commands run on the CPU (slow for the full model)")]
    rows = [("CUDA", f"available, CUDA {torch.version.cuda}")]
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        rows.append((f"GPU {index}", f"{name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"))
    return rows


def model_cache_status(model: str, revision: str | None) -> tuple[str, str | None]:
    """Where the model's files are (a folder or the HF cache) and at which revision; (status, fix)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return f"local folder {folder}", None
        return f"{folder} has no config.json", "point --model at a MiniCPM-o 2.6 checkpoint folder"
    try:
        from huggingface_hub import constants
    except Exception:  # noqa: BLE001
        return "unknown (huggingface_hub missing)", "pip install huggingface_hub"
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + model.replace("/", "--"))
    ref = repo_dir / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision if revision else None)
    snapshot = repo_dir / "snapshots" / commit if commit else None
    if snapshot and (snapshot / "config.json").exists():
        weights = list(snapshot.glob("*.safetensors"))
        state = "complete" if weights else "config only, weights not downloaded"
        return f"{model} in the cache at revision {commit[:12]} ({state})", (
            None if weights else f"run any model command online to download {model}")
    return f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})", (
        f"it is downloaded on first use (about 16 GB), or: huggingface-cli download {model}")


def quantization_status(opts) -> str:
    """The quantization a model command would load with, its kernel here and why, and the weights' memory."""
    try:
        from minicpmo_cli.api.engine import resolve_device, resolve_dtype
        from minicpmo_cli.errors import MiniCPMOError
        from minicpmo_cli.model import loading, quant
    except Exception:  # noqa: BLE001 - torch or transformers missing: reported above
        return "unknown (torch or transformers missing)"
    try:
        folder = loading.resolve_checkpoint_dir(opts.model, opts.revision, local_files_only=True)
        device = resolve_device(opts.device)
        return quant.quantization_preview(folder, opts.quantize, device.split(":")[0],
                                            resolve_dtype(opts.dtype, device))
    except MiniCPMOError as exc:
        return f"unknown ({exc})"
    except (OSError, ValueError, RuntimeError) as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def run_doctor() -> list[str]:
    """Print the report; return the list of fixes to apply (empty when all is well)."""
    opts = common.options()
    rows: list[tuple[str, str]] = [("minicpmo", _version_of("minicpmo_cli") or "?"),
                                   ("Python", f"{platform.python_version()} ({sys.executable})")]
    fixes: list[str] = []
    for name in ("torch", "transformers", "av", "soundfile", "librosa"):
        version = _version_of(name)
        rows.append((name, version or "MISSING"))
        if version is None:
            fixes.append(FIXES[name])
    rows += _gpu_lines()
    ffmpeg = shutil.which("ffmpeg")
    rows.append(("ffmpeg", ffmpeg or "not found (optional: PyAV decodes media without it)"))
    status, fix = model_cache_status(opts.model, opts.revision)
    rows.append(("model", status))
    if fix:
        fixes.append(fix)
    rows.append(("quantization", quantization_status(opts)))
    try:
        from huggingface_hub import constants

        cache_root = Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        cache_root = Path.home()
    probe = cache_root if cache_root.exists() else Path.home()
    free = shutil.disk_usage(probe).free / 2**30
    rows.append(("free disk", f"{free:.1f} GiB at {probe}"))
    if free < 20:
        fixes.append(f"free some disk at {probe}: the full model needs about 16 GB")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    if fixes:
        print("To fix:")
        for item in fixes:
            print(f"  - {item}")
    else:
        print("Everything needed is here.")
    return fixes


def register(app: typer.Typer) -> None:
    @app.command(help=common.examples_help(
        "Check Python, torch, transformers, the GPU, the media decoder and the model cache.",
        "minicpmo doctor", "minicpmo --model ./my-checkpoint doctor"))
    def doctor() -> None:
        run_doctor()
