"""A fairseq process that stops on an error exits with the error's status, not SIGABRT.

fairseq's ``BufferedIterator`` prepares batches in a daemon thread (``BackgroundConsumer``); with
``--num-workers 0`` that thread collates batches with torch operations.  When the main thread raises
(a criterion refusing a model on the first batch, say), the interpreter prints the traceback and
finalizes while that thread is still inside torch's C++ code; a daemon thread that wants the GIL back
after finalization began is ended with ``pthread_exit``, whose forced unwinding through torch's
``noexcept`` frames calls ``std::terminate``: "terminate called without an active exception", exit
134 instead of 1.

An ``atexit`` handler runs before that stage (after the traceback, while every thread can still
run): it tells each live consumer to stop after its current batch, drains its queue so that a
blocked ``put`` returns, and joins it.  The exit status is then the error's own.
"""
import atexit
import queue
import threading
import time

_installed = False

# Upper bound on the wait for a consumer to finish its current batch; past it the process exits as
# fairseq would have (a batch of a real corpus takes well under a second to collate).
JOIN_TIMEOUT_S = 60.0


def _consumers():
    try:
        from fairseq.data.iterators import BackgroundConsumer
    except ImportError:  # pragma: no cover - fairseq is a dependency
        return []
    return [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]


def _drain(q) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def stop_background_consumers(timeout_s: float = JOIN_TIMEOUT_S) -> int:
    """Stops fairseq's batch-preparing threads; returns how many were still alive afterwards."""
    consumers = _consumers()
    deadline = time.monotonic() + timeout_s
    for consumer in consumers:
        # BackgroundConsumer.run stops once count >= _max_len, after the put it is doing now
        consumer._max_len = 0
    for consumer in consumers:
        while consumer.is_alive() and time.monotonic() < deadline:
            _drain(consumer._queue)
            consumer.join(0.05)
    return sum(consumer.is_alive() for consumer in consumers)


def install_clean_exit() -> None:
    global _installed
    if not _installed:
        atexit.register(stop_background_consumers)
        _installed = True
