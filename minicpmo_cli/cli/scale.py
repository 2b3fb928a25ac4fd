"""Batch work beyond one process for `asr` and `tts --lines`: --workers, --devices, --shard, --ray.

The commands keep their own input listing, output Sink and exit codes; this module only picks the shard's
inputs and replaces the one in-process loop by a pool of worker processes (api/parallel.py) or a Ray Data
pipeline (api/ray_asr.py) that hands back the same records, which the command writes as before.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import typer

from minicpmo_cli.cli import common

WORKERS = typer.Option(None, "--workers", min=1, help="Worker processes, each with its own model (on --device, "
                                                      "or on each of --devices); with --ray: Ray actors.")
DEVICES = typer.Option(None, "--devices", metavar="0,1,...|all",
                       help="One worker per listed GPU (all: every GPU here), taking inputs from one queue.")
SHARD = typer.Option(None, "--shard", metavar="I/N",
                     help="Do only the I-th of N parts of the inputs (0 <= I < N; the same parts on every "
                          "machine): for job arrays over a shared folder.")
RAY = typer.Option(None, "--ray", metavar="[ADDRESS]",
                   help="Run as a Ray Data pipeline (extra [ray]): on the cluster at ADDRESS (auto, HOST:PORT, "
                        "ray://HOST:PORT), or on a local Ray started for this run when ADDRESS is omitted.")

LOCAL_RAY = "local"  # what a bare --ray becomes (see ray_flag_args)
_ADDRESS = re.compile(r"^(auto|local|(ray|https?)://\S+|[\w.\-\[\]]+:\d+)$")


@dataclass(frozen=True)
class Scale:
    workers: int | None = None
    devices: str | None = None
    shard: str | None = None
    ray: str | None = None

    @property
    def parallel(self) -> bool:
        return self.ray is not None or self.devices is not None or (self.workers or 1) > 1

    def check(self) -> None:
        """Usage errors, before any input is read."""
        from minicpmo_cli.api.parallel import parse_shard

        if self.shard is not None:
            parse_shard(self.shard)
        if self.ray is not None and self.devices is not None:
            common.fail_usage("--devices does not combine with --ray: Ray places one actor per GPU of the "
                              "cluster (--workers N sets how many actors)")
        if self.ray is not None and not _ADDRESS.match(self.ray):
            common.fail_usage(f"--ray {self.ray!r}: not a Ray address (auto, HOST:PORT, ray://HOST:PORT); a bare "
                              "--ray starts a local Ray")
        if self.devices is not None:
            from minicpmo_cli.api.parallel import parse_devices

            parse_devices(self.devices)  # no GPU, or one that is not here: said before any work starts


def ray_flag_args(argv: list[str]) -> list[str]:
    """A bare `--ray` becomes `--ray=local`; `--ray ADDRESS` becomes `--ray=ADDRESS` (Typer has no optional
    option values). The next word counts as an address only when it looks like one and is not a file."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] == "--ray":
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is not None and _ADDRESS.match(following) and not os.path.exists(following):
                out.append(f"--ray={following}")
                i += 2
                continue
            out.append(f"--ray={LOCAL_RAY}")
        else:
            out.append(argv[i])
        i += 1
    return out


def select_shard(items: list, shard: str | None) -> list:
    """The items of shard I/N (keyed by their path relative to their argument); all items without --shard."""
    from minicpmo_cli.api.parallel import in_shard, parse_shard, shard_key

    if shard is None:
        return items
    part = parse_shard(shard)
    chosen = [item for item in items if in_shard(shard_key(item.path, item.relative_dir), part)]
    common.info(f"shard {part}: {len(chosen)} of {len(items)} input(s)")
    return chosen


def pool(scale: Scale, chunk_size: int, job: Any):
    from minicpmo_cli.api.parallel import WorkerPool, worker_devices

    devices = worker_devices(scale.devices, scale.workers, _default_device() if scale.devices is None else "cpu")
    return WorkerPool(job, devices, chunk_size, warn=common.warn, debug=common.debug, tracebacks=common.options().debug)


def _default_device() -> str:
    from minicpmo_cli.api.engine import resolve_device

    # Resolved once here: every worker gets the same answer and the parent says so once.
    return resolve_device(common.options().device, common.warn)


def transcribe(scale: Scale, items: list, options, decode, ordered: bool) -> Iterator[tuple[Any, Any]]:
    """(item, record) for every item, from worker processes or Ray; in input order when ``ordered``."""
    from minicpmo_cli.api.asr import AudioInput
    from minicpmo_cli.api.jobs import AsrJob

    payloads = [AudioInput("-", sys.stdin.buffer.read()) if item.path == "-" else AudioInput.from_path(item.path)
                for item in items]
    job = AsrJob(common.load_options(), options, decode)
    chunk = inputs_per_chunk(options.batch_size)
    if scale.ray is not None:
        from minicpmo_cli.api.ray_asr import RayRun

        verbose = common.options().verbose or common.options().debug
        runner = RayRun(scale.ray, scale.workers, warn=common.warn, debug=common.debug, verbose=verbose)
        results = runner.run(job, payloads, chunk, ordered=ordered)
    else:
        results = pool(scale, chunk, job).run(payloads, ordered=ordered)
    for index, record in results:
        yield items[index], record


# Inputs handed to a worker (or a Ray actor's batch) at a time when --batch-size leaves the pieces per pass to
# each worker's device: a few CPU batches' worth, small enough that the last inputs of a run spread over workers.
DEFAULT_INPUTS_PER_CHUNK = 8


def inputs_per_chunk(batch_size: int | None) -> int:
    """Inputs per chunk sent to a worker: --batch-size when given, else DEFAULT_INPUTS_PER_CHUNK."""
    return DEFAULT_INPUTS_PER_CHUNK if batch_size is None else max(1, batch_size)


def options_of(workers: Optional[int], devices: Optional[str], shard: Optional[str], ray: Optional[str]) -> Scale:
    scale = Scale(workers, devices, shard, ray)
    scale.check()
    return scale
