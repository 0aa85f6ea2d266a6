"""Background prefetching of iterator items.

`Prefetcher` runs a daemon thread that pulls items from a source iterable, applies an optional
``put_fn`` (typically a host->device transfer) and keeps up to ``depth`` results ready in a
bounded queue, so the consumer (the training step) rarely waits on input. This module is
deliberately framework-agnostic: it does not import JAX and can be tested without it.
"""

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")
S = TypeVar("S")

# Short enough that close() is observed promptly, long enough not to busy-spin.
_POLL_S = 0.05
_JOIN_TIMEOUT_S = 5.0


class _End:
    """Marker queued by the producer once the source is exhausted."""


_END = _End()


class _Failure:
    """Wrapper for an exception raised in the producer, queued for the consumer to re-raise."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Generic[T]):
    """Background thread that keeps up to `depth` items ready (e.g. batches already on device).

    Iterate over it like the source; use it as a context manager (or call `close`) so the
    thread is stopped when the consumer exits early or is interrupted.
    """

    def __init__(
        self,
        source: Iterable[S],
        put_fn: Callable[[S], T] | None = None,
        *,
        depth: int = 2,
        name: str = "accelctl-prefetch",
    ) -> None:
        """Start prefetching from `source`.

        Args:
            source: Iterable of raw items; iterated only from the background thread.
            put_fn: Applied to each item in the background thread (e.g. device transfer);
                identity if None.
            depth: Maximum number of processed items held ready; must be >= 1.
            name: Name of the background thread.

        Returns:
            None.

        Raises:
            ValueError: If `depth` < 1.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._source = source
        self._put_fn: Callable[[Any], Any] = put_fn if put_fn is not None else _identity
        self._depth = depth
        self._name = name
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._exhausted = False
        self._wait_time_s = 0.0
        self._items = 0
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    @property
    def wait_time_s(self) -> float:
        """Total seconds the consumer spent blocked in `__next__` waiting for an item.

        Returns:
            Accumulated wait time in seconds.
        """
        return self._wait_time_s

    @property
    def items(self) -> int:
        """Number of items handed to the consumer so far.

        Returns:
            Item count.
        """
        return self._items

    @property
    def depth(self) -> int:
        """Maximum number of items kept ready.

        Returns:
            The queue bound.
        """
        return self._depth

    @property
    def thread(self) -> threading.Thread:
        """The background producer thread (exposed for monitoring and tests).

        Returns:
            The thread object.
        """
        return self._thread

    def __iter__(self) -> Iterator[T]:
        """Return self, so the prefetcher can be used directly in a for loop.

        Returns:
            This prefetcher.
        """
        return self

    def __next__(self) -> T:
        """Return the next prefetched item, blocking until one is ready.

        Returns:
            The next item, with `put_fn` already applied.

        Raises:
            StopIteration: When the source is exhausted or the prefetcher is closed.
            BaseException: The original exception raised by the source or `put_fn`, once.
        """
        if self._exhausted or self._closed:
            raise StopIteration
        start = time.perf_counter()
        try:
            item = self._get()
        finally:
            self._wait_time_s += time.perf_counter() - start
        if isinstance(item, _End):
            self._exhausted = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._exhausted = True
            self.close()
            exc = item.exc
            exc.add_note(f"(raised in prefetch thread {self._name!r})")
            raise exc
        self._items += 1
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the background thread and release buffered items; safe to call repeatedly.

        Returns:
            None.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        # Draining frees a producer blocked on a full queue right away instead of after a poll.
        self._drain()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=_JOIN_TIMEOUT_S)
        # The producer may have pushed one last item before seeing the stop event; drop it so
        # buffered (possibly device-resident) items are not kept alive by this object.
        self._drain()

    def __enter__(self) -> "Prefetcher[T]":
        """Enter the context manager.

        Returns:
            This prefetcher.
        """
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the prefetcher, including on exceptions such as KeyboardInterrupt.

        Args:
            exc_type: Exception type, if the block raised.
            exc: Exception instance, if the block raised.
            tb: Traceback, if the block raised.

        Returns:
            None, so exceptions from the block propagate.
        """
        self.close()

    def _get(self) -> Any:
        """Block until the producer has queued something, or the prefetcher is closed."""
        # Poll rather than block forever so a close() from another thread, or a producer that
        # died without queueing anything, cannot hang the consumer.
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closed:
                    return _END
                if not self._thread.is_alive():
                    # The producer may have queued its last item just before exiting.
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        return _END

    def _put(self, item: Any) -> bool:
        """Queue `item` unless stopped; returns False if the stop event interrupted the put."""
        # A timed put in a loop (instead of a blocking put) guarantees close() can always stop
        # the producer, even if nobody drains the queue any more.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _drain(self) -> None:
        """Discard everything currently queued."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _produce(self) -> None:
        """Producer loop run in the background thread."""
        iterator: Iterator[Any] | None = None
        try:
            iterator = iter(self._source)
            for raw in iterator:
                # Check before put_fn so no transfer work is started after close().
                if self._stop.is_set():
                    return
                if not self._put(self._put_fn(raw)):
                    return
            self._put(_END)
        # BaseException too, so the consumer sees every failure instead of a silent early end.
        except BaseException as exc:
            self._put(_Failure(exc))
        finally:
            # Closing here, in the thread that drives the iterator, avoids "generator already
            # executing" errors that a close() from the consumer thread could trigger.
            close = getattr(iterator, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # best-effort cleanup; must not mask the real outcome
                    pass


def _identity(x: Any) -> Any:
    """Return `x` unchanged (default `put_fn`)."""
    return x
