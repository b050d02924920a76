"""Ordered thread prefetch of an ``index -> item`` function.

Training loops here draw their batches from pure functions of an integer (the
pretraining mixture's ``batch_at(step)``, adaptation's ``(epoch, step)`` batches
flattened to a global step). Decoding, cropping and augmenting run in numpy and
OpenCV, which release the GIL, so preparing the next few items in threads while
the current step runs hides most of the data time. Because the items are pure
functions of their index, prefetching changes nothing but the wall time: the
items, and their order, are exactly those of the plain loop ``[fn(i) for i in indices]``.

Two forms:

* :func:`prefetched` for a plain ``for`` loop over a known sequence of indices;
* :class:`Prefetcher` for loops that ask for index after index (``get(i)``) and
  may stop or jump; items already scheduled for indices below the requested one
  are cancelled.

Exceptions raised by ``fn`` surface in the caller, at the item that raised them.
Torch-free (threads and the standard library only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["Prefetcher", "prefetched"]

T = TypeVar("T")


def _check(workers: int, ahead: int | None) -> tuple[int, int]:
    if int(workers) != workers or workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    ahead = workers if ahead is None else ahead
    if int(ahead) != ahead or ahead < 0:
        raise ValueError(f"ahead must be a non-negative integer, got {ahead!r}")
    return int(workers), int(ahead)


def prefetched(
    fn: Callable[[int], T], indices: Iterable[int], workers: int = 1, ahead: int | None = None
) -> Iterator[tuple[int, T]]:
    """Yield ``(index, fn(index))`` for each index of ``indices``, in order, prepared ahead in threads.

    Args:
        fn: a function of the index (thread-safe; a pure function of the index for reproducible runs).
        indices: the indices, consumed lazily (may be a ``range`` or any iterable).
        workers: threads computing items (0: no threads, ``fn`` runs in the caller when the item is needed).
        ahead: items in flight beyond the one being consumed (default: ``workers``).

    Closing the generator early (``break`` in the loop) cancels the items not yet started.
    """
    workers, ahead = _check(workers, ahead)
    if workers == 0:
        for index in indices:
            yield index, fn(index)
        return
    source = iter(indices)
    pending: list[tuple[int, Future]] = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bilalora-prefetch")
    try:

        def fill() -> None:
            while len(pending) < ahead + 1:
                try:
                    index = next(source)
                except StopIteration:
                    return
                pending.append((index, pool.submit(fn, index)))

        fill()
        while pending:
            index, future = pending.pop(0)
            item = future.result()
            fill()
            yield index, item
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class Prefetcher(Generic[T]):
    """Serve ``fn(index)`` on request, with ``index + 1 .. index + ahead`` prepared in threads.

    Use as a context manager (the threads stop on exit)::

        with Prefetcher(batch_of_step, workers=2, stop=total_steps) as source:
            for step in range(start, total_steps):
                batch = source.get(step)

    Args:
        fn: a function of the index (thread-safe).
        workers: threads (0: ``get`` calls ``fn`` directly).
        ahead: indices scheduled beyond the requested one (default: ``workers``).
        stop: indices at or above it are never scheduled ahead (``None``: no bound).
    """

    def __init__(self, fn: Callable[[int], T], workers: int = 1, ahead: int | None = None, stop: int | None = None):
        self.fn = fn
        self.workers, self.ahead = _check(workers, ahead)
        self.stop = stop
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Prefetcher[T]:
        if self.workers > 0:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bilalora-prefetch")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what was scheduled and stop the threads (idempotent)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @property
    def pending(self) -> list[int]:
        """The indices scheduled and not yet served, sorted."""
        return sorted(self._pending)

    def get(self, index: int) -> T:
        """``fn(index)``; schedules the next ``ahead`` indices and cancels scheduled ones below ``index``."""
        index = int(index)
        if self._pool is None:
            return self.fn(index)
        for stale in [i for i in self._pending if i < index]:
            self._pending.pop(stale).cancel()
        last = index + self.ahead
        if self.stop is not None:
            last = min(last, self.stop - 1)
        for ahead_index in range(index, last + 1):
            if ahead_index not in self._pending:
                self._pending[ahead_index] = self._pool.submit(self.fn, ahead_index)
        future = self._pending.pop(index, None)
        if future is None:  # index at or beyond stop: computed on request
            return self.fn(index)
        return future.result()
