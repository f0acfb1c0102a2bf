"""A test that would block fails instead: SIGALRM after a bound (main thread, Unix)."""
import contextlib
import signal


@contextlib.contextmanager
def fail_after(seconds: float, what: str):
    """Raise TimeoutError("test exceeded S s: WHAT") in the block once ``seconds`` have passed."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {seconds} s: {what}")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
