"""`minicpmo models`: the MiniCPM-o checkpoints in the Hugging Face cache, as ollama and the hub CLI show them.

`models` (or `models list`) lists the official checkpoints and any other cached MiniCPM-o one, with revisions,
sizes and which one --model resolves to; `models pull [ID]` downloads (the hub resumes a partial download by
itself); `models rm ID` frees the space after a confirmation. Only the hub's cache is read and written: no
torch, no model load.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from minicpmo_cli.cli import common
from minicpmo_cli.errors import HubUnavailable, InputError, ModelLoadError, UsageError

OFFICIAL = ("openbmb/MiniCPM-o-2_6", "openbmb/MiniCPM-o-2_6-int4")  # bf16, and the GPTQ int4

app = typer.Typer(
    name="models", invoke_without_command=True, no_args_is_help=False,
    help=common.examples_help(
        "List, download and remove MiniCPM-o checkpoints in the Hugging Face cache (HF_HOME / HF_HUB_CACHE).",
        "minicpmo models", "minicpmo models pull openbmb/MiniCPM-o-2_6-int4",
        "minicpmo models rm openbmb/MiniCPM-o-2_6"),
)


@dataclasses.dataclass
class CachedRevision:
    """One row of the listing: a checkpoint at one revision (``revision`` None: not cached)."""

    id: str
    revision: str | None = None
    refs: list[str] | None = None
    size: int = 0
    status: str = "not downloaded"
    path: str | None = None
    selected: bool = False  # the one --model (and --revision) resolves to


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------------------------------- reading
def _scan():
    """huggingface_hub's scan of the cache; an empty one when the cache folder does not exist yet."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(hub_cache())
    except CacheNotFound:
        return None


def _missing_files(snapshot: Path) -> str | None:
    """What a snapshot lacks to load (None: complete): its config, or weights the index names."""
    from minicpmo_cli.errors import MiniCPMOError
    from minicpmo_cli.model.checkpoint_files import weight_files

    if not (snapshot / "config.json").is_file():
        return "config.json missing"
    try:
        weight_files(snapshot)
    except MiniCPMOError:
        return "weights missing"
    return None


def _is_minicpmo(snapshot: Path) -> bool:
    try:
        config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "minicpmo"


def partial_bytes(repo_id: str) -> int:
    """Bytes of interrupted downloads (blobs/*.incomplete) of ``repo_id``: what `models pull` resumes."""
    blobs = hub_cache() / ("models--" + repo_id.replace("/", "--")) / "blobs"
    return sum(f.stat().st_size for f in blobs.glob("*.incomplete")) if blobs.is_dir() else 0


def cached_revisions() -> list[CachedRevision]:
    """The official checkpoints (cached or not) and every other cached MiniCPM-o one, a row per revision."""
    from minicpmo_cli.model.checkpoint_files import cached_snapshot

    scan = _scan()
    repos = {r.repo_id: r for r in (scan.repos if scan else ()) if r.repo_type == "model"}
    opts = common.options()
    chosen = cached_snapshot(opts.model, opts.revision) if opts.model.count("/") == 1 else None
    rows = []
    for repo_id in sorted(set(OFFICIAL) | set(repos), key=lambda r: (r not in OFFICIAL, r.lower())):
        repo = repos.get(repo_id)
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True) if repo else []
        if repo_id not in OFFICIAL and not any(_is_minicpmo(r.snapshot_path) for r in revisions):
            continue
        for revision in revisions:
            missing = _missing_files(revision.snapshot_path)
            rows.append(CachedRevision(
                repo_id, revision.commit_hash, sorted(revision.refs), revision.size_on_disk,
                "complete" if missing is None else f"incomplete ({missing})", str(revision.snapshot_path),
                chosen is not None and repo_id == opts.model and revision.snapshot_path == chosen))
        if not revisions:
            rows.append(CachedRevision(repo_id, status="partial download" if partial_bytes(repo_id) else
                                       "not downloaded"))
    return rows


# ---------------------------------------------------------------------------------------------- listing
def _resolution_line(rows: list[CachedRevision]) -> str:
    from minicpmo_cli.model.checkpoint_files import means_local_folder

    opts = common.options()
    if Path(opts.model).expanduser().exists() or means_local_folder(opts.model):
        return f"--model {opts.model} is a local folder: the cache is not used"
    chosen = next((row for row in rows if row.selected), None)
    if chosen is None:
        at = f" at revision {opts.revision}" if opts.revision else ""
        return (f"--model {opts.model}{at} is not in the cache: the first model command downloads it, "
                f"or beforehand: minicpmo models pull {opts.model}")
    return f"--model {opts.model} resolves to revision {chosen.revision[:12]} (* above, {chosen.status})"


def list_models(as_json: bool) -> None:
    rows = cached_revisions()
    if as_json:
        common.write_stdout(json.dumps([dataclasses.asdict(row) for row in rows], indent=2) + "\n")
        return
    table = [("", "MODEL", "REVISION", "SIZE", "STATUS")]
    noted = set()  # a repo's interrupted download is told once, on its first row
    for row in rows:
        status = row.status + (f" ({', '.join(row.refs)})" if row.refs else "")
        partial = partial_bytes(row.id) if row.id not in noted else 0
        noted.add(row.id)
        if partial:
            status += f"; {human_size(partial)} of an interrupted download (models pull {row.id} resumes it)"
        table.append(("*" if row.selected else "", row.id, (row.revision or "-")[:12],
                      human_size(row.size) if row.revision else "-", status))
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[4] for line in table]
    lines += ["", _resolution_line(rows), f"cache: {hub_cache()}"]
    common.write_stdout("\n".join(line.rstrip() for line in lines) + "\n")


@app.callback()
def models(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="One JSON list of the rows (for scripts).")) -> None:
    if ctx.invoked_subcommand is None:
        list_models(as_json)


@app.command("list", help=common.examples_help("List the cached MiniCPM-o checkpoints (the same as `models`).",
                                               "minicpmo models list", "minicpmo models list --json"))
def list_command(as_json: bool = typer.Option(False, "--json", help="One JSON list of the rows (for scripts).")):
    list_models(as_json)


# ---------------------------------------------------------------------------------------------- pull
@app.command(help=common.examples_help(
    "Download a checkpoint into the Hugging Face cache, with progress; an interrupted download resumes. "
    "Only the files the model needs (configs, tokenizers, weights, the speech assets).",
    "minicpmo models pull", "minicpmo models pull openbmb/MiniCPM-o-2_6-int4",
    "minicpmo --revision REV models pull openbmb/MiniCPM-o-2_6"))
def pull(model_id: Optional[str] = typer.Argument(None, metavar="[ID]",
                                                  help="Hub id (owner/name); default: --model.")) -> None:
    from minicpmo_cli.model.checkpoint_files import resolve_checkpoint_dir

    opts = common.options()
    repo_id = _hub_id_argument(model_id or opts.model, "models pull")
    if not opts.offline:
        common.info(f"downloading {repo_id} into {hub_cache()}"
                    f"{' (about 16 GB)' if repo_id == common.DEFAULT_MODEL else ''}; "
                    "an interrupted download resumes where it stopped")
    with _hub_progress(common.show_progress()):
        snapshot = resolve_checkpoint_dir(repo_id, opts.revision, local_files_only=opts.offline or None)
    missing = _missing_files(snapshot)
    if missing is not None and opts.offline:
        raise HubUnavailable(f"only partly in the cache ({missing}) and --offline forbids downloading the rest",
                             repo_id)
    if missing is not None:
        raise ModelLoadError(f"the download finished, but the snapshot is not a checkpoint ({missing})", snapshot)
    size = sum(f.stat().st_size for f in snapshot.rglob("*") if f.is_file())
    common.write_stdout(f"{repo_id} at revision {snapshot.name[:12]}: {human_size(size)}, complete, in {snapshot}\n")


def _hub_id_argument(value: str, command: str) -> str:
    from minicpmo_cli.model.checkpoint_files import means_local_folder

    if Path(value).expanduser().exists() or means_local_folder(value):
        raise UsageError(f"{command} takes a hub id of the form owner/name; {value!r} is not one "
                         "(a local folder needs no download)")
    return value


class _hub_progress:
    """The hub's own download bars on or off for the block (they are global in huggingface_hub)."""

    def __init__(self, show: bool) -> None:
        self.show = show

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        self.was_disabled = are_progress_bars_disabled()
        (enable_progress_bars if self.show else disable_progress_bars)()
        return self

    def __exit__(self, *exc) -> None:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (disable_progress_bars if self.was_disabled else enable_progress_bars)()


# ---------------------------------------------------------------------------------------------- rm
@app.command(help=common.examples_help(
    "Remove a checkpoint (every cached revision, and any interrupted download) from the Hugging Face cache, "
    "after a confirmation. Without a terminal to confirm on, -y is required (exit 2 otherwise).",
    "minicpmo models rm openbmb/MiniCPM-o-2_6", "minicpmo models rm -y openbmb/MiniCPM-o-2_6-int4"))
def rm(model_id: str = typer.Argument(..., metavar="ID", help="Hub id (owner/name)."),
       yes: bool = typer.Option(False, "-y", "--yes", help="Remove without asking.")) -> None:
    import shutil

    repo_id = _hub_id_argument(model_id, "models rm")
    folder = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        raise InputError(f"not in the Hugging Face cache ({hub_cache()}): nothing to remove", repo_id)
    scan = _scan()
    repo = next((r for r in (scan.repos if scan else ()) if r.repo_path == folder), None)
    revisions = [r.commit_hash for r in repo.revisions] if repo else []
    # Revisions are matched by commit hash across the whole cache: scan only this repo so that no other
    # repository with the same commit is touched.
    strategy = dataclasses.replace(scan, repos=frozenset({repo})).delete_revisions(*revisions) if revisions else None
    size = (strategy.expected_freed_size if strategy else 0) + partial_bytes(repo_id)
    what = f"{repo_id} ({human_size(size)}, {len(revisions)} revision(s)) from {hub_cache()}"
    if not yes and not _confirmed(f"Remove {what}? [y/N] ", what):
        common.err(f"minicpmo: kept {repo_id}: nothing removed")
        return
    if strategy is not None:
        strategy.execute()
    shutil.rmtree(folder, ignore_errors=True)  # what the strategy leaves: interrupted downloads, empty folders
    if folder.exists():
        raise InputError("could not remove every file of the checkpoint (permissions?)", folder)
    common.write_stdout(f"removed {what}\n")


def _confirmed(question: str, what: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError(f"models rm: no terminal to confirm on; add -y to remove {what}")
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")
