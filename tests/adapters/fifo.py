"""Named pipes for the "never open what is not a regular file" tests.

Opening a FIFO for reading blocks until a writer comes. A test that got that wrong would
hang the suite, so `without_hanging` runs the call on a thread and, if it has not
returned in time, plays the writer (which releases the reader) and fails the test.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def without_hanging(call: Callable[[], T], pipes: Iterable[Path], timeout: float = 5.0) -> T:
    """`call()`'s result; fails the test if it blocks on one of `pipes`."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed back to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for pipe in pipes:  # a waiting reader lets a non-blocking writer in; EOF follows
            with contextlib.suppress(OSError):
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout)
        pytest.fail(f"blocked for {timeout} s opening a named pipe")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
