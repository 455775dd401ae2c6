"""A non-reentrant lock whose waiters get it in the order they asked (the host's `FIFOLock`).

Difference: here release hands the lock straight to the oldest waiter, so the order is strict; the host's
releases its inner lock and wakes the oldest waiter, so a thread arriving at that instant can get in first.
Like the host's, acquiring it again from the thread that holds it blocks forever (blocking=False: False).
Ports modules/fifo_lock.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import collections
import threading


class FIFOLock:
    def __init__(self):
        self._guard = threading.Lock()
        self._held = False
        self._queue = collections.deque()

    def acquire(self, blocking=True):
        with self._guard:
            if not self._held:
                self._held = True
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()  # release() sets it after making us the holder
        return True

    def release(self):
        with self._guard:
            if not self._held:
                raise RuntimeError("release unlocked lock")
            if self._queue:
                self._queue.popleft().set()  # the lock stays held, now by the oldest waiter
            else:
                self._held = False

    def locked(self):
        return self._held

    def waiting(self):
        """How many threads wait (stand-in only; for tests)."""
        with self._guard:
            return len(self._queue)

    __enter__ = acquire

    def __exit__(self, exc_type, exc, tb):
        self.release()
