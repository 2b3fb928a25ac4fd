"""The TTS engine: the audio frames of many utterances decoded together, one batched step for all of them.

Each request (generation/tts_requests.py) holds a slot of a preallocated TTS key/value pool
(generation/kv_pool.py ``KVPool`` over the TTS decoder's config) while its pieces are spoken; a finished or
aborted request frees its slot and the next waiting one is admitted into it at once (continuous refill), its
first text chunk prefilled while the other rows keep their state. A step (:meth:`TTSEngine.step`):

- schedule: abort what was aborted or cancelled, admit waiting requests into free slots;
- one forward for every row (:func:`slot_step`: each row one new position in its own slot, at its own
  length, under its own streaming mask) through the per-layer pieces of generation/forward.py, eager or
  through a step runner (fixed shapes: the pool's slot bucket and capacity, for CUDA graphs / compile);
- each row draws its frame with its own sampling state and sampler (generation/tts_rows.py ``Row``; the
  temperature, warpers, EOS ban and softmax of rows with the same settings run once for all of them,
  row-wise, ``draw_rows``); the end of speech of every row that is due is read back in one host read;
  rows whose call ended prefill their next text chunk, start their next piece, or finish.

Streamed speech (:class:`TTSStreamRequest`) runs as rows too (generation/tts_stream.py ``StreamRow``): the
streaming schedule of generation/speech.py in the row's slot, its frame calls drawn in the same steps, its
frames handed to the caller as they settle (the caller vocodes them); a row whose text feed has nothing yet
waits in its slot, skipped by the steps. The pool's size is bounded (``max_positions``: admission waits
rather than grow past it) and an idle pool shrinks back to a small one.

A row draws exactly what the one-at-a-time loop draws for it (generation/tts_decode.py ``iter_frames``:
same schedule, same draws, same rewinds); its logits are those of a batched step (see tests/model/
test_tts_engine.py for the check against the loop). A background thread steps while there is work
(``threaded=True``, started on the first submit); otherwise whoever waits on a handle steps the engine.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque

import torch
import torch.nn.functional as F

from minicpmo_cli.errors import UsageError
from minicpmo_cli.generation import forward as fwd
from minicpmo_cli.generation.kv_pool import KVPool, slot_bucket
from minicpmo_cli.generation.static_cache import bucket_length
from minicpmo_cli.generation.step_runner import StepRunner
from minicpmo_cli.generation.tts_decode import CHECK_FRAMES, dtype_probe
from minicpmo_cli.generation.tts_requests import (
    TextFeed,
    TTSHandle,
    TTSPiece,
    TTSRequest,
    TTSStats,
    TTSStreamRequest,
)
from minicpmo_cli.generation.tts_rows import CALL_FRAMES, Row, draw_rows
from minicpmo_cli.generation.tts_stream import StreamRow

__all__ = ["TTSEngine", "TTSHandle", "TTSPiece", "TTSRequest", "TTSStats", "TTSStreamRequest", "TextFeed",
           "slot_step"]

logger = logging.getLogger(__name__)

MAX_BATCH = 16  # slots of a TTS engine (utterances decoded together)
# The pool's size in positions (slots x capacity; ~61 KB each for the released TTS in bf16): a pool never
# grows past MAX_POOL_POSITIONS by admitting requests (16 rows of 2048 positions, 2 GB), and an idle pool
# larger than IDLE_POOL_POSITIONS is given back for a small one (4 slots of the first capacity).
MAX_POOL_POSITIONS = 16 * 2048
IDLE_POOL_POSITIONS = 4 * 512


class TTSEngine:
    """Continuous batching of TTS utterances over a :class:`KVPool`; see the module docstring.

    ``tts``: the ``ConditionalChatTTS``; ``tokenizer``: its ChatTTS tokenizer; ``runner``: a step runner
    (None: eager); ``check_every``: frames between two reads of a row's end of speech. ``max_positions``:
    the pool's slots x capacity that admitting a request never passes (requests wait for a slot instead; a
    row in flight that needs a longer capacity always gets it, so the rows already admitted may take the pool
    past it until they end); ``idle_positions``: an idle pool larger than this is replaced by a small one."""

    def __init__(self, tts, tokenizer, *, runner: StepRunner | None = None, max_batch: int | None = MAX_BATCH,
                 threaded: bool = True, check_every: int = CHECK_FRAMES, max_positions: int = MAX_POOL_POSITIONS,
                 idle_positions: int = IDLE_POOL_POSITIONS) -> None:
        self.tts, self.tokenizer = tts, tokenizer
        self.runner = runner if runner is not None else StepRunner("eager", "TTS batch")
        # None: the LLM engine's slots come from a memory budget (a server without --max-batch); the TTS's own
        # bound is max_positions, so it takes the default
        max_batch = MAX_BATCH if max_batch is None else max_batch
        self.max_batch, self.threaded, self.check_every = slot_bucket(max_batch), threaded, int(check_every)
        self.max_positions, self.idle_positions = int(max_positions), int(idle_positions)
        self.pool: KVPool | None = None
        self.running: dict[int, Row] = {}
        self.stats = TTSStats()
        self._waiting: deque[TTSHandle] = deque()
        self._aborts: list[TTSHandle] = []
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stepping = threading.Lock()  # one step at a time (callers step an engine without a thread)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._poked = False  # something happened since the loop last looked (a submit, an abort, new text)
        self._free_masks: dict[tuple, torch.Tensor] = {}
        if threaded:
            atexit.register(_close_at_exit, weakref.ref(self))

    # ----- any thread ---------------------------------------------------------------------------------

    def submit(self, request: TTSRequest) -> TTSHandle:
        """Queue ``request``; its text is tokenized here (a text that does not fit fails in the caller); a
        streamed request's (:class:`TTSStreamRequest`) as its schedule reads it, on the engine's thread."""
        streamed = isinstance(request, TTSStreamRequest)
        if streamed and hasattr(request.text_pieces, "bind"):
            request.text_pieces.bind(self._wake)
        handle = TTSHandle(self, request, [] if streamed else [self._prompt(piece.text) for piece in request.pieces])
        if not streamed and not request.pieces:
            handle._finish("stop")
            return handle
        with self._work:
            if self._closed:
                raise UsageError("the TTS engine is closed")
            self._waiting.append(handle)
            self._poked = True
            self._work.notify()
            if self.threaded and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="minicpmo-tts-engine", daemon=True)
                self._thread.start()
        return handle

    def abort(self, handle: TTSHandle) -> None:
        with self._work:
            self._aborts.append(handle)
            self._poked = True
            self._work.notify()

    def snapshot(self) -> TTSStats:
        """The counters with the rows running and waiting and the pool's size now (for a metrics reader)."""
        with self._lock:
            stats = TTSStats(**vars(self.stats))
            stats.running, stats.waiting = len(self.running), len(self._waiting)
            stats.slots_total = self.pool.slots if self.pool is not None else 0
            stats.pool_bytes = self.pool_bytes
        return stats

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.running and not self._aborts

    def close(self) -> None:
        """Wait for the engine thread to end (requests in flight are finished first); called at exit."""
        with self._work:
            self._closed = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _prompt(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        from minicpmo_cli.processing.tts_text import build_streaming_text_mask, encode_tts_prompt, prepare_tts_text

        tts = self.tts
        prompt, count = prepare_tts_text(self.tokenizer, text, tts.streaming_text_reserved_len, tts.num_spk_embs)
        input_ids = encode_tts_prompt(self.tokenizer, prompt).to(tts.device)
        mask = build_streaming_text_mask(count, tts.streaming_text_reserved_len, tts.num_spk_embs).to(tts.device)
        return input_ids, mask

    def _wake(self) -> None:
        """New text for a waiting row (generation/tts_requests.py TextFeed)."""
        with self._work:
            self._poked = True
            self._work.notify()

    def _loop(self) -> None:
        while True:
            with self._work:
                if self.idle:
                    self._thread = None
                    self._work.notify_all()
                    return
                self._poked = False
            if not self.step():  # every row waits for text: sleep until a feed, a submit or an abort wakes us
                with self._work:
                    # the timeout: a waiting row's cancel event (set by its owner, who wakes nobody) is seen
                    self._work.wait_for(lambda: self._poked or self.idle, timeout=0.1)

    # ----- the stepping thread ------------------------------------------------------------------------

    def step(self) -> bool:
        """One schedule -> batched step -> draws -> end-of-speech reads; False when there was nothing to do."""
        with self._stepping, torch.inference_mode():
            try:
                return self._step()
            except Exception as exc:  # noqa: BLE001 - every request in flight learns of it
                logger.debug("TTS engine step failed", exc_info=True)
                for row in list(self.running.values()):
                    self._release(row, "error", exc)
                return True

    def _step(self) -> bool:
        self._take_aborts()
        self._admit()
        self._resume_waiting()
        rows = [row for row in self.running.values() if not row.waiting]
        if not rows:
            self._shrink_if_idle()
            return False
        logits = self._forward(rows)
        due = draw_rows(rows, logits, self.stats)
        self.stats.steps += 1
        self.stats.frames += len(rows)
        self.stats.peak_rows = max(self.stats.peak_rows, len(rows))
        if due:
            flags = torch.stack([d.eos for row in due for d in row.drawn]).tolist()  # one read for all rows
            offset = 0
            for row in due:
                count = len(row.drawn)
                row.settle(flags[offset : offset + count])
                offset += count
            for row in due:
                if row.call_over and not row.end_call():
                    self._release(row, "stop")
            self._shrink_if_idle()
        return True

    def _take_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
            cancelled = [h for h in self._waiting if _cancelled(h)]
            for handle in {*aborts, *cancelled}:
                if handle in self._waiting:
                    self._waiting.remove(handle)
                    handle._finish("abort")
        for row in list(self.running.values()):
            if row.handle in aborts or _cancelled(row.handle):
                row.stop()
                self._release(row, "abort")

    def _resume_waiting(self) -> None:
        """Streamed rows waiting for text whose text came go on (their schedule prefills, opens a call)."""
        for row in [row for row in self.running.values() if row.waiting and row.text_ready]:
            try:
                if not row.resume():
                    self._release(row, "stop")
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                self._release(row, "error", exc)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
            if not self._free_slot():
                return
            with self._lock:
                handle = self._waiting.popleft()
            slot = self.pool.alloc()
            row = (StreamRow if isinstance(handle.request, TTSStreamRequest) else Row)(self, handle, slot)
            self.running[slot] = row
            try:
                if row.start_piece() is False:  # a streamed text that asks for no frames
                    self._release(row, "stop")
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                self._release(row, "error", exc)

    def _free_slot(self) -> bool:
        """A free slot: a first pool, or a grown one (more slots, up to ``max_batch`` and as many as
        ``max_positions`` allows at the pool's capacity); False when full."""
        needed = self.tts.condition_length + CALL_FRAMES + 1
        if self.pool is None:
            weight = self.tts.emb_text.weight
            capacity = bucket_length(needed)
            slots = self._slots_within(min(self.max_batch, len(self._waiting)), capacity, 1)
            self.pool = KVPool.empty(self.tts.model.config, slots, capacity, weight.dtype, weight.device)
            return True
        if self.pool.free_slots:
            return True
        used = self.pool.slots - self.pool.free_slots
        wanted = self._slots_within(min(self.max_batch, used + len(self._waiting)), self.pool.capacity, 0)
        if wanted <= self.pool.slots:
            return False
        self._replace_pool(self.pool.grown(wanted, needed))
        return True

    def _slots_within(self, count: int, capacity: int, least: int) -> int:
        """A power of two of slots for ``count`` requests, as many as ``max_positions`` holds at ``capacity``
        (at least ``least``)."""
        slots = slot_bucket(count)
        while slots > 1 and slots * capacity > self.max_positions:
            slots //= 2
        return slots if slots * capacity <= self.max_positions else least

    def _shrink_if_idle(self) -> None:
        """An idle pool larger than ``idle_positions`` is given back for a small one (the first capacity)."""
        pool = self.pool
        if pool is None or self.running or pool.slots * pool.capacity <= self.idle_positions:
            return
        with self._lock:
            if self._waiting:
                return
        capacity = bucket_length(self.tts.condition_length + CALL_FRAMES + 1)
        slots = slot_bucket(max(self.idle_positions // capacity, 1))
        while slots > 1 and slots * capacity > self.idle_positions:
            slots //= 2
        slots = min(slots, pool.slots)
        buffer = pool.keys[0]
        self._replace_pool(KVPool.empty(self.tts.model.config, slots, capacity, buffer.dtype, buffer.device))

    @property
    def pool_bytes(self) -> int:
        """Bytes held by the pool's key/value buffers (0 without a pool)."""
        if self.pool is None:
            return 0
        return sum(buffer.numel() * buffer.element_size() for buffer in (*self.pool.keys, *self.pool.values))

    def make_room(self, needed: int) -> None:
        """Room for ``needed`` positions in every slot (a row's next call): a longer pool when it lacks it,
        with as many slots as ``max_positions`` holds at the new capacity, but never fewer than the slots up
        to the highest one in use (those rows keep their slot; only free slots at the top are dropped)."""
        old = self.pool
        if old.fits(needed):
            return
        capacity = max(old.capacity, bucket_length(needed))
        top = max((slot for slot, used in enumerate(old.used) if used), default=0) + 1
        slots = min(max(slot_bucket(top), self._slots_within(old.slots, capacity, 1)), old.slots)
        buffer = old.keys[0]
        pool = KVPool.empty(self.tts.model.config, slots, capacity, buffer.dtype, buffer.device)
        for new, previous in zip((*pool.keys, *pool.values), (*old.keys, *old.values)):
            new[:, :, : old.capacity] = previous[:slots]
        pool.lengths, pool.used = old.lengths[:slots], old.used[:slots]
        self._replace_pool(pool)

    def _replace_pool(self, pool: KVPool) -> None:
        old, self.pool = self.pool, pool
        self.runner.forget(old.generation)  # never replay a graph over the old buffers

    def _release(self, row: Row, reason: str, error: BaseException | None = None) -> None:
        if self.running.get(row.slot) is row:
            del self.running[row.slot]
            self.pool.free(row.slot)
        if reason == "stop":
            self.stats.finished += 1
        row.handle._finish(reason, error)

    # ----- the batched step ---------------------------------------------------------------------------

    def _forward(self, rows: list[Row]) -> torch.Tensor:
        """One step over slots ``[0, span)``: raw float32 logits ``[span, num_vq, V]`` (free slots: junk)."""
        tts, pool = self.tts, self.pool
        span, device = pool.span(), tts.device
        static = self.runner.static_shapes
        width = pool.capacity if static else max(pool.lengths[row.slot] for row in rows) + 1
        codes = torch.zeros(span, 1, tts.num_vq, dtype=torch.long, device=device)
        bos = torch.zeros(span, dtype=torch.bool)
        positions = [0] * span  # a free slot writes at its position 0 (zeroed when the slot is taken)
        masks = [self._free_mask(width)] * span
        probe = dtype_probe(tts)
        for row in self.running.values():
            if row.waiting:  # its step is junk, written where its next frame will be written over it
                positions[row.slot] = pool.lengths[row.slot]
        for row in rows:
            state, past = row.state, pool.lengths[row.slot]
            positions[row.slot] = past
            if state.progress == state.start:
                bos[row.slot] = True
            else:
                codes[row.slot] = state.ids[0, state.progress - 1 : state.progress]
            masks[row.slot] = row.mask.at(past, pool.capacity, probe)[..., :width]
        embeds = tts.embed_codes(codes)[:, 0]
        if bos.any():
            embeds = torch.where(bos.to(device)[:, None], tts.bos_embeds()[0], embeds)
        positions = _positions_on(positions, device)
        mask = torch.cat(masks)
        heads = [head.weight for head in tts.head_code]  # the weight norm once per step
        if static:
            if self.runner.mode == "compile" and device.type == "cuda":
                pool.mark_static()
            key = (span, pool.capacity, pool.generation)
            logits = self.runner.run(key, _runner_step, (embeds, positions, mask, *heads), (tts, pool))
        else:
            logits = slot_step(tts, embeds, positions, pool, mask, heads)
        for row in rows:
            pool.lengths[row.slot] += 1
        return logits

    def _free_mask(self, width: int) -> torch.Tensor:
        """A free slot's mask row: its own position 0 only (a row of nothing but masked keys would be NaN)."""
        dtype, device = self.tts.dtype, self.tts.device
        key = (width, dtype, str(device))
        mask = self._free_masks.get(key)
        if mask is None:
            mask = torch.full((1, 1, 1, width), torch.finfo(dtype).min, dtype=dtype, device=device)
            mask[..., 0] = 0
            self._free_masks = {key: mask}  # one width at a time: it changes every step when eager
        return mask


def slot_step(tts, embeds: torch.Tensor, positions: torch.Tensor, pool: KVPool, mask: torch.Tensor,
              heads: list[torch.Tensor]) -> torch.Tensor:
    """One audio step for slots ``[0, B)`` of ``pool``: input embeddings ``[B, D]`` at ``positions`` ``[B]``
    (each row its own), each written at its own position of its slot; attention over the first
    ``mask.shape[-1]`` positions of every slot under the additive ``mask`` ``[B, 1, 1, width]``. Raw float32
    logits ``[B, num_vq, V]``. The LLM's per-layer pieces (generation/forward.py) on the Llama decoder; with
    width = the pool's capacity every shape is fixed by (B, capacity): what a step runner captures."""
    decoder = tts.model
    batch, width = embeds.shape[0], mask.shape[-1]
    cos, sin = fwd.step_rotary(decoder, embeds, positions[:, None])
    hidden = embeds
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = fwd._qkv(layer, hidden, cos, sin)
        pool.write_rows(index, k, v, positions)
        keys = pool.keys[index][:batch, :, :width]
        values = pool.values[index][:batch, :, :width]
        hidden = hidden + fwd._linear(attn.o_proj, fwd.attend_one(attn, q, keys, values, mask))
        hidden = hidden + fwd._mlp(layer, hidden)
    hidden = decoder.norm(hidden)
    return torch.stack([F.linear(hidden, w.to(hidden.dtype)) for w in heads], dim=1).float()


def _runner_step(embeds, positions, mask, *rest):
    """:func:`slot_step` with the step runner's argument order: the inputs (``embeds``, ``positions``,
    ``mask``, the code heads), then what a key pins (``tts``, ``pool``)."""
    heads, (tts, pool) = list(rest[:-2]), rest[-2:]
    return slot_step(tts, embeds, positions, pool, mask, heads)


def _positions_on(positions: list[int], device: torch.device) -> torch.Tensor:
    """The step's positions on ``device``; to a GPU through pinned memory, so that the host does not wait for
    the kernels queued before the copy (a copy from pageable memory would, at every step)."""
    if device.type != "cuda":
        return torch.tensor(positions, dtype=torch.long, device=device)
    staged = torch.tensor(positions, dtype=torch.long).pin_memory()
    return staged.to(device, non_blocking=True)


def _cancelled(handle: TTSHandle) -> bool:
    cancel = handle.request.cancel
    return cancel is not None and cancel.is_set()


def _close_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close()
