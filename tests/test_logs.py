"""What the daemon's log looks like to journald and to a terminal: one formatted line
per record line, every line with its priority under systemd, and library messages
printed once, through the daemon's own handler."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from wangend.logs import setup_logging


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers; pytest's come back after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def test_under_journald_every_line_carries_the_priority(
    root_handlers: None, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    setup_logging("info")
    logging.getLogger("wangend").error("cannot start:\nport 7870 is taken\nby pid 42")
    logging.getLogger("wangend").info("listening")
    lines = capfd.readouterr().err.splitlines()
    assert lines == [
        "<3>wangend: cannot start:",
        "<3>port 7870 is taken",
        "<3>by pid 42",
        "<6>wangend: listening",
    ]


def test_library_messages_are_printed_once_through_the_daemons_handler(
    root_handlers: None, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from wangend.server.daemon import quiet_library_progress_bars

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    setup_logging("info")
    quiet_library_progress_bars()
    for name in ("huggingface_hub.file_download", "diffusers.models", "transformers.modeling"):
        logging.getLogger(name).warning("%s says hello", name.split(".")[0])
    err = capfd.readouterr().err
    for library in ("huggingface_hub", "diffusers", "transformers"):
        [line] = [line for line in err.splitlines() if f"{library} says hello" in line]
        assert " WARNING " in line  # the daemon's format: time, level, logger
