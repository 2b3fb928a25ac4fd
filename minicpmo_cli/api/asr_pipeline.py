"""The front stages of `asr`: decode audio in a thread pool, then the VAD over many files at once.

    inputs (read on the caller's thread) -> decode (DECODE threads, files in order) -> VAD (the front thread;
    every file decoded by then, in fixed-shape batches: media/vad_batch.py) -> pieces -> a bounded queue ->
    the model stage (api/asr.py, on the caller's thread)

The stages overlap: files are decoded while the VAD runs on the ones before them, and both run while the model
transcribes earlier pieces. Memory stays bounded on any number of files: at most ``ahead_files`` inputs are
taken and not yet handed on. The inputs are iterated on the caller's thread (the CLI claims each input's outputs
there, with its own options). Groups handed on are lists of (job, samples) in input order; how files fall into
groups depends on timing, never the result (the VAD of a file is the same in any group).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

DECODE_THREADS = 2  # files decoded at once (PyAV, libsndfile, soxr and numpy release the GIL)
VAD_FILES = 32  # files whose VAD runs in one call at most
AHEAD_FILES = 64  # inputs taken and not yet handed on to the model stage, at most (bounds memory)
_END = object()


@dataclass(frozen=True)
class Stages:
    """How the front stages run (the defaults are what `asr` uses; tests set vad_files=1 for the per-file VAD)."""

    decode_threads: int = DECODE_THREADS
    vad_files: int = VAD_FILES
    ahead_files: int = AHEAD_FILES
    vad_device: str | None = None  # None: the GPU when there is one, else the CPU


def vad_device(requested: str | None) -> str:
    """Where the VAD runs: the requested device, or the first GPU when there is one, else the CPU."""
    if requested not in (None, "auto"):
        return "cpu" if str(requested).startswith("mps") else str(requested)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def staged_groups(inputs: Iterable[Any], decode: Callable[[Any], tuple[Any, Any]],
                  segment: Callable[[list[tuple[Any, Any]], Callable[[], Any]], None], stages: Stages = Stages(),
                  prepare: Callable[[], None] | None = None) -> Iterator[list[tuple[Any, Any]]]:
    """Groups of ``decode(input)`` results, in input order, each segmented together by ``segment(group, vad)``
    (``vad()``: the front thread's media.vad_batch.BatchVAD, made on first use) before it is handed on.
    ``prepare`` runs on this thread before any other starts (the imports the other threads need)."""
    if prepare is not None:
        prepare()
    ahead = max(2, stages.ahead_files)
    taken: queue.Queue = queue.Queue()
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    front = threading.Thread(target=_front, args=(taken, decode, segment, stages, out, stop),
                             name="minicpmo-asr-front", daemon=True)
    front.start()
    items = iter(inputs)
    fed = handed = 0
    exhausted = False
    try:
        while True:
            while not exhausted and fed - handed < ahead:
                try:
                    taken.put(next(items))
                    fed += 1
                except StopIteration:
                    exhausted = True
                    taken.put(_END)
            group = _ready_groups(out)
            if isinstance(group, BaseException):
                raise group
            if group:
                handed += len(group)
                yield group
            if out_ended(group):
                return
    finally:
        stop.set()
        if not exhausted:
            taken.put(_END)
        front.join(timeout=5)


class _Ended(list):
    """The last group: the inputs are all handed on after it."""


def out_ended(group) -> bool:
    return isinstance(group, _Ended)


def _ready_groups(out: queue.Queue):
    """The next group, joined with every group already waiting behind it (the model stage then batches the
    language probes of all of them); an _Ended group when the end came too; an exception as it came."""
    joined: list = []
    block = True
    while True:
        try:
            item = out.get(block=block)
        except queue.Empty:
            return joined
        if item is _END:
            return _Ended(joined)
        if isinstance(item, BaseException):
            return item
        joined.extend(item)
        block = False


def _front(taken: queue.Queue, decode, segment, stages: Stages, out: queue.Queue, stop: threading.Event) -> None:
    """Decode what ``taken`` brings in threads, segment what is decoded in groups, put the groups on ``out``."""
    pool = ThreadPoolExecutor(max_workers=max(1, stages.decode_threads), thread_name_prefix="minicpmo-audio")
    vad: list = []

    def get_vad():  # made when a group first needs it (never with --no-vad)
        if not vad:
            vad.append(_make_vad(stages))
        return vad[0]

    try:
        pending: list = []
        exhausted = False
        while not stop.is_set():
            while not exhausted:  # take every input waiting; wait for one only when nothing is in work
                try:
                    item = taken.get(block=not pending)
                except queue.Empty:
                    break
                if item is _END:
                    exhausted = True
                else:
                    pending.append(pool.submit(decode, item))
            if not pending:
                break  # the inputs ran out (or there were none)
            pending[0].result()  # wait for the oldest; take it and every one decoded after it
            count = 1
            while count < min(len(pending), stages.vad_files) and pending[count].done():
                count += 1
            group = [future.result() for future in pending[:count]]
            del pending[:count]
            segment(group, get_vad)
            out.put(group)
        out.put(_END)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        out.put(exc)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for made in vad:
            made.close()


def _make_vad(stages: Stages):
    from minicpmo_cli.media.vad_batch import BatchVAD

    return BatchVAD(vad_device(stages.vad_device))

def import_decoding_modules(vad: bool = True) -> None:
    """Import, on this thread, every module the decoding and VAD threads use, before any of them starts.

    A first import on another thread while this thread is importing transformers for the model load is
    how threads deadlock on Python's module locks (issue: a folder mixing wav and mp3 hung): PyAV is first
    imported by the first mp3, torch by the VAD.
    """
    import av  # noqa: F401
    import soundfile  # noqa: F401
    import soxr  # noqa: F401

    import minicpmo_cli.media.audio  # noqa: F401
    import minicpmo_cli.processing.segments  # noqa: F401

    if vad:
        import torch  # noqa: F401

        import minicpmo_cli.media.vad_batch  # noqa: F401
