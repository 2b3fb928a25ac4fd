"""`minicpmo doctor`: what this machine has, what is missing, and how to fix it. Always exits 0.

It reads versions from the installed packages' metadata and the GPU from nvidia-smi: importing torch and
transformers only to ask their versions took most of its run time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import typer

from minicpmo_cli.cli import common
from minicpmo_cli.errors import describe_error

FIXES = {
    "torch": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu (CPU only), "
             "or pip install torch==2.13.0 (with CUDA)",
    "transformers": "pip install 'transformers>=5,<6'",
    "av": "pip install av",
    "soundfile": "pip install soundfile",
    "librosa": "pip install librosa",
}
PACKAGES = {"minicpmo": "minicpmo-cli", "torch": "torch", "transformers": "transformers", "av": "av",
            "soundfile": "soundfile", "librosa": "librosa"}  # shown name -> distribution name


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_build_cuda() -> str | None:
    """The CUDA version torch was built for, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        match = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        return match.group(1) if match else None
    return None


def _gpu_lines() -> list[tuple[str, str]]:
    if _version_of("torch") is None:
        return [("CUDA", "unknown (torch missing)")]
    build = _torch_build_cuda()
    gpus = _nvidia_gpus()
    if build is None:
        note = " (this machine has an NVIDIA GPU: install a CUDA build of torch)" if gpus else ""
        return [("CUDA", f"not in this torch build (CPU only): commands run on the CPU{note}")]
    if not gpus:
        return [("CUDA", f"torch built for CUDA {build}, but no NVIDIA GPU found: commands run on the CPU")]
    rows = [("CUDA", f"torch built for CUDA {build}")]
    rows += [(f"GPU {index}", gpu) for index, gpu in enumerate(gpus)]
    return rows


def _nvidia_gpus() -> list[str]:
    """One line per GPU from nvidia-smi (name, free and total memory); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in filter(None, (raw.strip() for raw in out.splitlines())):
        name, free, total = (part.strip() for part in line.rsplit(",", 2))
        gpus.append(f"{name}, {free} free of {total}")
    return gpus


def model_cache_status(model: str, revision: str | None) -> tuple[str, str | None]:
    """Where the model's files are (a folder or the HF cache) and at which revision; (status, fix)."""
    from minicpmo_cli.model.checkpoint_files import cached_snapshot, means_local_folder

    folder = Path(model).expanduser()
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return f"local folder {folder}", None
        return f"{folder} has no config.json", "point --model at a MiniCPM-o 2.6 checkpoint folder"
    if folder.exists() or means_local_folder(model):
        return f"{folder}: no such checkpoint folder", "point --model at a MiniCPM-o 2.6 checkpoint folder"
    try:
        from huggingface_hub import constants
    except Exception:  # noqa: BLE001
        return "unknown (huggingface_hub missing)", "pip install huggingface_hub"
    snapshot = cached_snapshot(model, revision)
    if snapshot is not None:
        commit = snapshot.name
        weights = list(snapshot.glob("*.safetensors"))
        state = "complete" if weights else "config only, weights not downloaded"
        return f"{model} in the cache at revision {commit[:12]} ({state})", (
            None if weights else f"minicpmo models pull {model} downloads the rest (it resumes)")
    return f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})", (
        f"it is downloaded on first use (about 16 GB), or beforehand: minicpmo models pull {model} "
        f"(or hf download {model})")


def quantization_status(opts) -> str:
    """The quantization a model command would load with; under -v also its kernel here and why, and the
    weights' memory (that needs torch, which plain doctor never imports: it must stay instant)."""
    if not (opts.verbose or opts.debug):
        return _quantization_mode_only(opts)
    try:
        from minicpmo_cli.api.engine import resolve_device, resolve_dtype
        from minicpmo_cli.errors import MiniCPMOError
        from minicpmo_cli.model import quant
        from minicpmo_cli.model.checkpoint_files import resolve_checkpoint_dir
    except Exception:  # noqa: BLE001 - torch or transformers missing: reported above
        return "unknown (torch or transformers missing)"
    try:
        folder = resolve_checkpoint_dir(opts.model, opts.revision, local_files_only=True)
        device = resolve_device(opts.device)
        return quant.quantization_preview(folder, opts.quantize, device.split(":")[0],
                                            resolve_dtype(opts.dtype, device))
    except MiniCPMOError as exc:
        return f"unknown ({exc})"
    except (OSError, ValueError, RuntimeError) as exc:
        return f"unknown ({describe_error(exc)})"


def _quantization_mode_only(opts) -> str:
    """The mode from --quantize or the checkpoint's quantize_config.json, read without torch."""
    from minicpmo_cli.model.checkpoint_files import cached_snapshot

    hint = " (minicpmo -v doctor: kernel and weights' memory)"
    if opts.quantize not in (None, "none"):
        return f"{opts.quantize} (--quantize){hint}"
    folder = Path(opts.model).expanduser()
    folder = folder if folder.is_dir() else cached_snapshot(opts.model, opts.revision)
    if folder is not None and (folder / "quantize_config.json").exists():
        return f"int4 (GPTQ checkpoint){hint}"
    return f"none (full precision){hint}"


def run_doctor() -> list[str]:
    """Print the report; return the list of fixes to apply (empty when all is well)."""
    opts = common.options()
    from minicpmo_cli import __version__

    rows: list[tuple[str, str]] = [("minicpmo", __version__),
                                   ("Python", f"{platform.python_version()} ({sys.executable})")]
    fixes: list[str] = []
    for name in ("torch", "transformers", "av", "soundfile", "librosa"):
        version = _version_of(PACKAGES[name])
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
