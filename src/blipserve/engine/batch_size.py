"""How many rows one model call takes: as many as asked, until memory says otherwise.

A GPU's memory decides the largest batch that fits, and it depends on the model, its
precision, the generation settings (beams, texts per row, new tokens) and what else runs
on the card: no fixed default suits them all.  So the engine starts at its configured
batch size and, when a call runs out of memory, frees what the failed call held, halves the
rows per call, and runs the same rows again in the smaller calls: no row is lost and no
caller sees the failure.  The size that fitted is remembered per generation setting, so
later batches go straight to it.  A single row that does not fit fails (its batch's rows get
the error), and the engine goes on.

Memory short for a while (another process on the card, a burst of long requests) should
not keep batches small until a restart: after ``probe_after`` calls that filled the learnt
size with no shortage between them (calls of fewer rows do not count), the sizer tries
twice as many rows.  If that fits, it keeps it (and later tries again, up to the configured
size); if not, the call is run again at the size that fitted, and the next try waits twice
as long, so a card that is really that small costs one failed call per 100, 200, 400, ...
calls (at most 6,400: memory that comes back is used within hours, not days).

From the configured size, halving and doubling give the sizes BLIP's and BLIP-2's compiled
decoding steps (``--cuda-graphs``) are warmed up for when it is a power of two; a short
final call that runs out of memory may leave another size, which compiles on first use.

A streamed row (its text sent as decoded) may have sent pieces before its call ran out of
memory; :class:`SentOnce` makes its run again send only what goes beyond them.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Hashable

import torch

from blipserve.errors import InferenceError
from blipserve.types import TextSink

log = logging.getLogger(__name__)

#: the wait between tries at more rows doubles after each failed one, at most this often
_MOST_FAILED_TRIES = 6


class BatchSizer:
    """The rows per model call for each shape of work (rows that share generation settings
    need about the same memory each), starting at ``max_batch_size``.  Thread-safe."""

    def __init__(self, max_batch_size: int, probe_after: int = 100) -> None:
        self.max_batch_size = max_batch_size
        self.probe_after = probe_after
        self.out_of_memory_calls = 0  # model calls that ran out of memory, all told
        self._fits: dict[Hashable, int] = {}
        self._full_calls: dict[Hashable, int] = {}  # calls in a row that filled the size
        self._failed_tries: dict[Hashable, int] = {}  # tries at twice as many in a row
        self._probing: dict[Hashable, int] = {}  # shapes just doubled -> the size that fitted
        self._lock = threading.Lock()

    def limit(self, shape: Hashable) -> int:
        """Rows per call for ``shape``: what fitted so far, else ``max_batch_size``."""
        with self._lock:
            return self._fits.get(shape, self.max_batch_size)

    def out_of_memory(self, shape: Hashable, rows: int) -> int:
        """A call of ``rows`` rows of ``shape`` ran out of memory: the rows per call from now
        on (half as many).  Raises :class:`InferenceError` when one row did not fit."""
        with self._lock:
            self.out_of_memory_calls += 1
        if rows <= 1:
            raise InferenceError(
                "out of memory on a single row: the model and its generation settings "
                "(beams, texts per row, new tokens) need more memory than the device has free"
            )
        with self._lock:
            smaller = min(self._fits.get(shape, self.max_batch_size), rows // 2)
            fitted = self._probing.pop(shape, None)
            if fitted is not None and rows > fitted:
                # A try at more rows than fitted: back to those, and the next try waits
                # twice as long.  (A call no larger failed for want of memory, not the try.)
                smaller = fitted
                tries = self._failed_tries.get(shape, 0) + 1
                self._failed_tries[shape] = min(tries, _MOST_FAILED_TRIES)
            self._fits[shape] = max(1, smaller)
            self._full_calls[shape] = 0
            log.warning(
                "out of memory with %d rows in one model call; %d rows a call from now on "
                "for these generation settings",
                rows,
                self._fits[shape],
            )
            return self._fits[shape]

    def fitted(self, shape: Hashable, rows: int) -> None:
        """A call of ``rows`` rows of ``shape`` fitted; after enough calls that filled a
        learnt size, the next ones get twice as many rows (up to ``max_batch_size``, when
        the shape's entry goes)."""
        with self._lock:
            size = self._fits.get(shape, self.max_batch_size)
            if rows < size:
                return  # (a call that was not full: nothing learnt)
            if self._probing.pop(shape, None) is not None:
                self._failed_tries.pop(shape, None)  # twice as many fitted: the usual wait
            if shape not in self._fits:
                return  # (the configured size)
            full = self._full_calls.get(shape, 0) + 1
            self._full_calls[shape] = full
            if full < self.probe_after * 2 ** self._failed_tries.get(shape, 0):
                return
            self._full_calls[shape] = 0
            larger = min(2 * size, self.max_batch_size)
            self._probing[shape] = size
            if larger == self.max_batch_size:
                del self._fits[shape]
            else:
                self._fits[shape] = larger
            log.info("%d rows a call fitted %d times; trying %d", size, full, larger)

    def known(self) -> dict[Hashable, int]:
        """The sizes learnt so far (shape -> rows per call)."""
        with self._lock:
            return dict(self._fits)

    def smallest(self) -> int:
        """The fewest rows per call any setting is down to (``max_batch_size`` if none)."""
        with self._lock:
            return min(self._fits.values(), default=self.max_batch_size)


def release_memory(device: torch.device) -> None:
    """Give back what a failed call held: its tensors (once the exception is gone, with
    its frames) and, on a GPU, the allocator's cached blocks, so the smaller calls that
    follow have the memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SentOnce:
    """A streamed row's sink (:data:`~blipserve.types.TextSink`) for calls that may run
    again: each run's text is compared with what the client has had, and only what goes
    beyond it is passed on.  Greedy decoding and beam search say the same again; a run that
    says something else (sampling draws anew) sends nothing more, and the answer's text,
    sent with it at the end, is what counts."""

    def __init__(self, sink: TextSink) -> None:
        self.sink = sink
        self.sent: dict[int, str] = {}  # text index -> what the client has had
        self.said: dict[int, str] = {}  # ... what this run has said
        self.diverged: set[int] = set()

    def again(self) -> None:
        """A new run of the row begins."""
        self.said.clear()

    def __call__(self, index: int, piece: str) -> None:
        said = self.said.get(index, "") + piece
        self.said[index] = said
        sent = self.sent.get(index, "")
        if index in self.diverged or not (said.startswith(sent) or sent.startswith(said)):
            self.diverged.add(index)
            return
        if len(said) > len(sent):
            self.sent[index] = said
            self.sink(index, said[len(sent) :])
