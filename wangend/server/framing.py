"""NDJSON framing without sockets: bytes in, complete request lines out.

This module exists so framing can be read and tested on its own (tests/server/
test_framing.py feeds it bytes; no socket is involved). A line is refused as soon as the
bytes buffered for it pass the cap, before its newline arrives, so a client cannot make
the daemon buffer an endless line. The connection that owns a framer (connection.py)
turns `LineTooLong` into a -32006 reply and closes. At the end of the stream `finish()`
hands out a last line that has no newline: `printf '{...}' | socat - UNIX-CONNECT:...`
sends exactly that, and dropping it without a word left the user with no clue.
"""

from __future__ import annotations

__all__ = ["LineFramer", "LineTooLong"]


class LineTooLong(Exception):
    """A line passed the cap. `lines` are the complete lines that came before it."""

    def __init__(self, limit: int, lines: list[bytes]) -> None:
        super().__init__(f"line longer than {limit} bytes")
        self.limit = limit
        self.lines = lines


class LineFramer:
    """Splits a byte stream into lines (sans-IO).

    A line may hold at most `max_line_bytes` bytes before its `\\n`; a trailing `\\r` is
    removed and blank lines are skipped. Partial lines are kept as a list of chunks and
    joined once, so a long line is copied a bounded number of times.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.limit = max_line_bytes
        self._parts: list[bytes] = []
        self._partial = 0  # bytes of the unfinished line

    @property
    def buffered(self) -> int:
        return self._partial

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines in `data` (plus what was buffered); raises LineTooLong."""
        lines: list[bytes] = []
        start = 0
        end = data.find(b"\n")
        if end >= 0 and self._parts:
            self._parts.append(data[:end])
            line, self._parts, self._partial = b"".join(self._parts), [], 0
            self._take(line, lines)
            start = end + 1
            end = data.find(b"\n", start)
        while end >= 0:
            self._take(data[start:end], lines)
            start = end + 1
            end = data.find(b"\n", start)
        if start < len(data):
            rest = data[start:] if start else data
            self._parts.append(rest)
            self._partial += len(rest)
            if self._partial > self.limit:
                raise LineTooLong(self.limit, lines)
        return lines

    def finish(self) -> list[bytes]:
        """The stream has ended: the unterminated last line, if it holds anything."""
        lines: list[bytes] = []
        if self._parts:
            line, self._parts, self._partial = b"".join(self._parts), [], 0
            self._take(line, lines)
        return lines

    def _take(self, line: bytes, lines: list[bytes]) -> None:
        if len(line) > self.limit:
            raise LineTooLong(self.limit, lines)
        if line.endswith(b"\r"):
            line = line[:-1]
        if line and not line.isspace():
            lines.append(line)
