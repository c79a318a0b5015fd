"""Logging for the daemon: one setup at start, one level change on reload."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["set_log_level", "setup_logging"]


def setup_logging(level: str) -> None:
    """journald-friendly `<N>` level prefixes under systemd, plain lines otherwise."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    prefixes = {"DEBUG": "<7>", "INFO": "<6>", "WARNING": "<4>", "ERROR": "<3>", "CRITICAL": "<2>"}

    class _Formatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            if not under_journal:
                return text
            # journald reads each line on its own: every line of a multi-line record
            # (a traceback, a library's message) carries the record's priority.
            prefix = prefixes.get(record.levelname, "")
            return prefix + text.replace("\n", "\n" + prefix)

    fmt = "%(name)s: %(message)s"
    if not under_journal:
        fmt = "%(asctime)s %(levelname)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    logging.getLogger().handlers[:] = [handler]
    set_log_level(level)


def set_log_level(level: str) -> None:
    """Set the daemon's level; libraries that are chatty at INFO about things the daemon
    already reports stay at WARNING or above."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for name in ("httpx", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
