"""Waiting for something another thread or process does, without a fixed sleep."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], object], timeout: float = 15.0, every: float = 0.1) -> bool:
    """True as soon as `condition()` is; after `timeout`, whatever it says then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())
