"""Tests for accelctl.data.prefetch (pure Python, no JAX)."""

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from accelctl.data.prefetch import Prefetcher


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_order_preserved_with_put_fn() -> None:
    p = Prefetcher(range(20), lambda x: x * 10, depth=3, name="pf-order")
    assert list(p) == [x * 10 for x in range(20)]
    assert p.items == 20
    p.close()
    assert not p.thread.is_alive()


def test_identity_put_fn_and_stop_iteration_repeats() -> None:
    with Prefetcher(iter(["a", "b"]), name="pf-stop") as p:
        assert next(p) == "a"
        assert next(p) == "b"
        with pytest.raises(StopIteration):
            next(p)
        with pytest.raises(StopIteration):
            next(p)
    assert not p.thread.is_alive()


def test_source_exception_propagates_after_earlier_items() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("bad record 3")

    p = Prefetcher(source(), name="pf-src-err")
    got = [next(p), next(p)]
    assert got == [1, 2]
    with pytest.raises(ValueError, match="bad record 3") as info:
        next(p)
    assert any("prefetch thread" in note for note in info.value.__notes__)
    # Once the error has been delivered the prefetcher is closed.
    with pytest.raises(StopIteration):
        next(p)
    assert not p.thread.is_alive()


def test_put_fn_exception_propagates() -> None:
    def put_fn(x: int) -> int:
        if x == 2:
            raise RuntimeError("transfer failed")
        return x

    with Prefetcher(range(5), put_fn, name="pf-put-err") as p:
        assert next(p) == 0
        assert next(p) == 1
        with pytest.raises(RuntimeError, match="transfer failed"):
            next(p)
    assert not p.thread.is_alive()


def test_early_close_infinite_source_and_idempotent() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            closed.set()

    p = Prefetcher(source(), depth=2, name="pf-early-close")
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    p.close()
    assert not p.thread.is_alive()
    assert not _threads_named("pf-early-close")
    assert closed.is_set(), "source generator should be closed by the producer"
    p.close()  # idempotent
    with pytest.raises(StopIteration):
        next(p)


def test_keyboard_interrupt_in_with_block_stops_thread() -> None:
    holder: list[Prefetcher[int]] = []
    with pytest.raises(KeyboardInterrupt):
        with Prefetcher(itertools.count(), depth=2, name="pf-kbint") as p:
            holder.append(p)
            next(p)
            raise KeyboardInterrupt
    assert not holder[0].thread.is_alive()
    assert not _threads_named("pf-kbint")


def test_queue_is_bounded() -> None:
    depth = 2
    produced = 0

    def source() -> Iterator[int]:
        nonlocal produced
        for i in itertools.count():
            produced += 1
            yield i

    with Prefetcher(source(), depth=depth, name="pf-bounded") as p:
        for consumed in range(1, 8):
            next(p)
            time.sleep(0.02)  # slow consumer: give the producer time to run ahead
            # `depth` items in the queue plus one held by the producer waiting to be queued.
            assert produced - consumed <= depth + 1
        # The producer does run ahead up to the bound (poll: it is asynchronous).
        deadline = time.monotonic() + 2.0
        while produced - consumed < depth + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert produced - consumed == depth + 1
    assert not p.thread.is_alive()


def test_wait_time_grows_with_slow_source() -> None:
    def slow() -> Iterator[int]:
        for i in range(4):
            time.sleep(0.05)
            yield i

    with Prefetcher(slow(), name="pf-slow") as p:
        assert list(p) == [0, 1, 2, 3]
        assert p.wait_time_s > 0.1
        assert p.items == 4


@pytest.mark.parametrize("depth", [0, -1])
def test_invalid_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(range(3), depth=depth)
