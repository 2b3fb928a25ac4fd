"""The LLM engine's outputs (generation/engine.py): when the ids chosen on the device are read back, and how
they reach each request's reader: recorded on its handle at once, handed to a streaming reader at most every
``STREAM_PERIOD_S`` while many rows stream, and all at the finish; finished rows free their slots."""

from __future__ import annotations

import torch

from minicpmo_cli.generation.scheduler import Row

CHECK_EVERY = 8  # decode steps between two host reads of the chosen ids (when no request streams)
STREAMS_PER_READ = 2  # streaming rows per step between two hand-overs of their ids (stream_interval)
STREAM_PERIOD_S = 0.05  # while many rows stream, each gets its ids at most this often (20 times a second)
PACED_ABOVE = 4  # streams running at once above which deliveries are paced


class EngineOutputs:
    """Read-back and delivery of :class:`LLMEngine` (a part of it: the engine's scheduler, pool, pending
    ids, stats, ``check_every``, ``stream_period`` and ``clock``)."""

    def _must_read(self) -> bool:
        """Whether to read the chosen ids back now: every ``check_every`` steps, when a row reached its
        token limit, when a streamed row waits for its first id, and, while rows stream, every
        :func:`stream_interval` steps (one step with a few streams)."""
        if not self._pending:
            return False
        running = self.scheduler.running.values()
        if len(self._pending) >= self.check_every:
            return True
        if any(row.sampled >= row.request.settings.max_new_tokens for row in running if row.decoding):
            return True
        streams = [row for row in running if row.streams]
        if any(not row.handle.ids for row in streams):
            return True
        return bool(streams) and len(self._pending) >= stream_interval(len(streams), self.check_every)

    def _read_back(self) -> None:
        """One host read of every id chosen since the last: record them, finish and free rows that stopped
        or reached their limit, and hand the ids to the readers (:meth:`_deliver`)."""
        pending, self._pending = self._pending, []
        values = torch.cat([tokens for tokens, _ in pending]).tolist()
        chosen: dict[int, tuple[Row, list[int]]] = {}  # a row's ids of every pending step, in step order
        offset = 0
        for tokens, rows in pending:
            step = values[offset:offset + tokens.shape[0]]
            offset += tokens.shape[0]
            for row in rows:
                chosen.setdefault(id(row), (row, []))[1].append(step[row.slot])
        for row, ids in chosen.values():
            if not row.handle.done and self.scheduler.running.get(row.slot) is row:
                self._hand_over(row, ids)
        self._deliver()

    def _hand_over(self, row: Row, ids: list[int]) -> None:
        """``ids`` chosen for ``row`` in consecutive steps: kept up to its stop id or its token limit (a row
        that stopped between two reads decoded pads since), and the row released when it got there."""
        handle, settings = row.handle, row.request.settings
        ids = ids[:settings.max_new_tokens - len(handle.ids)]
        stop = next((index for index, token in enumerate(ids) if token in settings.stop_ids), None)
        if stop is not None:
            ids = ids[:stop + 1]
        handle._record(ids)
        row.unsent.extend(ids)
        self.stats_.generation_tokens_total += len(ids)
        if row.request.on_tokens is not None:
            row.request.on_tokens(ids)
        if stop is not None:
            self._release(row, "stop")
        elif len(handle.ids) >= settings.max_new_tokens:
            self._release(row, "length")

    def _deliver(self) -> None:
        """Hand the ids read back to the running rows' readers. While more than ``PACED_ABOVE`` rows
        stream, a stream gets its ids at most every ``stream_period`` seconds (its first id at once, its last
        ones when it finishes): every hand-over wakes a reader and sends its client a chunk, and with many
        streams those costs would take the time the steps need (a 1-token request sent while 15 answers
        streamed waited for them), while a reader of text sees no difference between words 1 ms and 50 ms
        apart."""
        running = self.scheduler.running.values()
        paced = self.stream_period > 0 and sum(row.streams for row in running) > PACED_ABOVE
        now = self.clock()
        for row in running:
            if not row.unsent:
                continue
            due = row.delivered_at is None or now - row.delivered_at >= self.stream_period
            if not (paced and row.streams) or due:
                row.handle._deliver(row.unsent)
                row.unsent, row.delivered_at = [], now

    def _release(self, row: Row, reason: str, error: BaseException | None = None) -> None:
        if self.scheduler.running.get(row.slot) is row:
            del self.scheduler.running[row.slot]
            self.pool.free(row.slot)
        if row.unsent:
            row.handle._deliver(row.unsent)
            row.unsent = []
        row.handle._finish(reason, error)

    def _fail_all(self, exc: BaseException) -> None:
        self._pending = []
        for row in list(self.scheduler.running.values()):
            self._release(row, "error", exc)


def stream_interval(streams: int, most: int = CHECK_EVERY) -> int:
    """Steps between two hand-overs of streamed ids while ``streams`` rows stream: 1 for up to
    ``STREAMS_PER_READ`` of them, then one more step per as many (at most ``most``). Every hand-over wakes each
    stream's reader and sends each client a chunk; with many streams those per-step costs (and on a GPU, a
    device sync every step) take the time the steps need, while a reader of one of many streams gets its text
    a few steps at a time. A stream's first id is handed over at once."""
    return max(1, min(most, streams // STREAMS_PER_READ))
