"""Threads for tests of thread safety: workers run to their end while another thread loops."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_beside(loop: Callable[[], None], workers: list[Callable[[], None]]) -> None:
    """Run ``workers`` in threads of their own while ``loop`` is called over and over in another.

    ``loop`` starts before the workers and is called until they have all returned, then once
    more at most; the function returns when every thread has ended. Exceptions are the
    callers' to record (a thread's exception does not reach the test).
    """
    stop = threading.Event()

    def repeat() -> None:
        while not stop.is_set():
            loop()

    background = threading.Thread(target=repeat)
    background.start()
    threads = [threading.Thread(target=work) for work in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    background.join()
