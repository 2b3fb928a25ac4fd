"""Finding a checkpoint: a local folder or a hub id (downloaded once into the hub cache), and its weight files."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            from minicpmo_cli.model.safetensors_reader import broken

            raise broken(index, "not a valid weights index (JSON with a weight_map)") from None
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


def cached_snapshot(model: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot folder of ``model`` at ``revision`` when it has a config.json, else None."""
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + model.replace("/", "--"))
    ref = repo_dir / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision if revision else None)
    snapshot = repo_dir / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and (snapshot / "config.json").exists() else None
