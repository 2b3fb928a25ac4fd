"""The front stages of `asr`: decode audio in a thread pool, then the VAD over many files at once.

    inputs (read on the caller's thread) -> decode (DECODE threads, files in order) -> VAD (the front thread;
    every file decoded by then, in fixed-shape batches: media/vad_batch.py) -> pieces -> a bounded queue ->
    the model stage (api/asr.py, on the caller's thread)

The stages overlap: files are decoded while the VAD runs on the ones before them, and both run while the model
transcribes earlier pieces. Memory stays bounded on any number of files: at most ``ahead_files`` inputs are
taken and not yet handed on. The inputs are iterated on the caller's thread (the CLI claims each input's outputs
there, with its own options). Groups handed on are lists of (job, samples) in input order; how files fall into
groups depends on timing, never the result (the VAD of a file is the same in any group). An input longer than
``stream_seconds`` is streamed instead (api/asr_stream.py): the front thread decodes and segments it chunk by
chunk and hands on its parts, each a group of one (job, Part), at most ``ahead_parts`` of them waiting, so
memory stays bounded on a file of any length too.
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
STREAM_SECONDS = 1200.0  # inputs whose header says they are longer are streamed (api/asr_stream.py)
AHEAD_PARTS = 4  # parts of a streamed input found and not yet taken by the model stage, at most
_END = object()


class Part:
    """A piece of a streamed input's work handed on as the entry of a group (``last``: its input's last;
    ``empty``: nothing to hand on, given only so that the front thread can look whether to stop)."""

    last: bool = False
    empty: bool = False


class Streamed:
    """What decode gives for an input it leaves to the front thread: ``parts(vad)`` yields its Parts."""

    def __init__(self, parts: Callable[[Callable[[], Any]], Iterator[Part]]) -> None:
        self.parts = parts


@dataclass(frozen=True)
class Stages:
    """How the front stages run (the defaults are what `asr` uses; tests set vad_files=1 for the per-file VAD)."""

    decode_threads: int = DECODE_THREADS
    vad_files: int = VAD_FILES
    ahead_files: int = AHEAD_FILES
    vad_device: str | None = None  # None: the GPU when there is one, else the CPU
    stream_seconds: float | None = STREAM_SECONDS  # None: every input decoded whole
    ahead_parts: int = AHEAD_PARTS


def vad_device(requested: str | None) -> str:
    """Where the VAD runs: the requested device, or the first GPU when there is one, else the CPU."""
    if requested not in (None, "auto"):
        return "cpu" if str(requested).startswith("mps") else str(requested)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def staged_groups(inputs: Iterable[Any], decode: Callable[[Any], tuple[Any, Any]],
                  segment: Callable[[list[tuple[Any, Any]], Callable[[], Any]], None], stages: Stages = Stages(),
                  prepare: Callable[[], None] | None = None,
                  stream: Callable[[Any, float | None], tuple[Any, Streamed] | None] | None = None,
                  ) -> Iterator[list[tuple[Any, Any]]]:
    """Groups of ``decode(input)`` results, in input order, each segmented together by ``segment(group, vad)``
    (``vad()``: the front thread's media.vad_batch.BatchVAD, made on first use) before it is handed on.
    ``prepare`` runs on this thread before any other starts (the imports the other threads need).
    ``stream(input, stages.stream_seconds)``, asked first, gives (job, Streamed) for an input to stream: its
    parts are handed on one group each, a Part as the entry's second item."""
    if prepare is not None:
        prepare()
    ahead = max(2, stages.ahead_files)
    taken: queue.Queue = queue.Queue()
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    room = threading.Semaphore(max(1, stages.ahead_parts))  # bounds the parts of a streamed input in ``out``
    if stream is not None:
        decode = _streaming(decode, stream, stages.stream_seconds)
    front = threading.Thread(target=_front, args=(taken, decode, segment, stages, out, stop, room),
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
            group = _ready_groups(out, room)
            if isinstance(group, BaseException):
                raise group
            if group:
                handed += sum(1 for _, item in group if not isinstance(item, Part) or item.last)
                yield group
            if out_ended(group):
                return
    finally:
        stop.set()
        if not exhausted:
            taken.put(_END)
        front.join(timeout=5)


def _streaming(decode, stream, seconds):
    def decode_or_stream(item):
        return stream(item, seconds) or decode(item)
    return decode_or_stream


class _Ended(list):
    """The last group: the inputs are all handed on after it."""


def out_ended(group) -> bool:
    return isinstance(group, _Ended)


class _PartGroup(list):
    """A group of one Part: taking it frees room for another."""


def _ready_groups(out: queue.Queue, room: threading.Semaphore):
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
        if isinstance(item, _PartGroup):
            room.release()
        joined.extend(item)
        block = False


def _front(taken: queue.Queue, decode, segment, stages: Stages, out: queue.Queue, stop: threading.Event,
           room: threading.Semaphore) -> None:
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
            _hand_on(group, segment, get_vad, out, stop, room)
        out.put(_END)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        out.put(exc)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for made in vad:
            made.close()


def _hand_on(group: list, segment, get_vad, out: queue.Queue, stop: threading.Event,
             room: threading.Semaphore) -> None:
    """Segment the decoded entries of ``group`` together and put them on ``out``; a streamed entry's parts
    follow in order, each as a group of its own, at most ``room`` of them waiting there."""
    plain: list = []
    for job, decoded in group + [(None, None)]:
        if plain and (job is None or isinstance(decoded, Streamed)):
            segment(plain, get_vad)
            out.put(plain)
            plain = []
        if isinstance(decoded, Streamed):
            for part in decoded.parts(get_vad):
                if stop.is_set():
                    return  # the consumer left: the rest of the input is not decoded
                if part.empty:
                    continue
                while not room.acquire(timeout=0.5):  # the consumer may leave while this waits: look again
                    if stop.is_set():
                        return
                out.put(_PartGroup([(job, part)]))
        elif job is not None:
            plain.append((job, decoded))


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
    import minicpmo_cli.media.audio_stream  # noqa: F401
    import minicpmo_cli.processing.segments  # noqa: F401

    if vad:
        import torch  # noqa: F401

        import minicpmo_cli.media.vad_batch  # noqa: F401
        import minicpmo_cli.processing.segments_stream  # noqa: F401 - media/vad_blocks.py with it
