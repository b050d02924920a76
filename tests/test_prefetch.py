"""Tests for bilalora.prefetch: ordered thread prefetch gives exactly the plain loop's items."""

from __future__ import annotations

import threading
import time

import pytest

from bilalora.prefetch import Prefetcher, prefetched


def _slow_square(delays: dict[int, float] | None = None, seen: list | None = None):
    lock = threading.Lock()

    def fn(index: int) -> int:
        time.sleep((delays or {}).get(index, 0.0))
        if seen is not None:
            with lock:
                seen.append(index)
        return index * index

    return fn


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_prefetched_yields_in_order_even_when_later_items_finish_first(workers):
    # item 0 is the slowest: with threads, 1..3 finish before it, yet the order must hold
    fn = _slow_square({0: 0.05, 1: 0.0, 2: 0.01})
    assert list(prefetched(fn, range(6), workers=workers)) == [(i, i * i) for i in range(6)]


def test_prefetched_runs_ahead_in_threads():
    started = []
    fn = _slow_square(seen=started)
    gen = prefetched(fn, range(100), workers=2, ahead=3)
    first = next(gen)
    time.sleep(0.05)
    assert first == (0, 0)
    # after consuming item 0, items 1..4 (ahead = 3 beyond the next) were scheduled, not all 100
    assert set(started) >= {0, 1, 2, 3} and max(started) <= 4
    gen.close()


def test_prefetched_propagates_the_error_at_its_item():
    def fn(index: int) -> int:
        if index == 3:
            raise ValueError("bad item 3")
        return index

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for index, item in prefetched(fn, range(10), workers=2):
            got.append(item)
    assert got == [0, 1, 2]


def test_prefetched_break_cancels_the_rest():
    seen = []
    fn = _slow_square({i: 0.02 for i in range(50)}, seen=seen)
    for index, _ in prefetched(fn, range(50), workers=1, ahead=2):
        if index == 1:
            break
    time.sleep(0.15)
    assert max(seen) <= 4  # the other 45 items were never computed


def test_prefetcher_get_serves_exact_items_and_schedules_ahead():
    seen = []
    with Prefetcher(_slow_square(seen=seen), workers=2, ahead=2, stop=5) as source:
        assert source.get(0) == 0
        assert source.pending == [1, 2]
        assert [source.get(i) for i in range(1, 5)] == [1, 4, 9, 16]
        assert source.pending == []  # never scheduled at or past stop
        assert source.get(7) == 49  # beyond stop: computed on request
    assert sorted(set(seen)) == [0, 1, 2, 3, 4, 7]


def test_prefetcher_jump_cancels_stale_indices_and_no_threads_mode():
    with Prefetcher(_slow_square({i: 0.05 for i in range(20)}), workers=1, ahead=3) as source:
        assert source.get(0) == 0
        assert source.get(10) == 100
        assert all(i >= 10 for i in source.pending)
    plain = Prefetcher(_slow_square(), workers=0)
    with plain:
        assert plain.get(3) == 9 and plain.pending == []


@pytest.mark.parametrize("workers, ahead", [(-1, None), (1.5, None), (1, -2)])
def test_bad_arguments(workers, ahead):
    with pytest.raises(ValueError):
        Prefetcher(lambda i: i, workers=workers, ahead=ahead)
    with pytest.raises(ValueError):
        next(prefetched(lambda i: i, range(3), workers=workers, ahead=ahead))
