"""Framing without sockets: bytes in, complete lines out, long lines refused early."""

from __future__ import annotations

import pytest

from wangend.server.framing import LineFramer, LineTooLong


def test_framer_joins_split_lines_and_splits_joined_ones() -> None:
    f = LineFramer(100)
    assert f.feed(b'{"a"') == []
    assert f.feed(b":1}\n{") == [b'{"a":1}']
    assert f.feed(b'"b":2}\n{"c":3}\n{"d"') == [b'{"b":2}', b'{"c":3}']
    assert f.buffered == 4
    assert f.feed(b":4}\n") == [b'{"d":4}']
    assert f.buffered == 0


def test_framer_tolerates_crlf_and_skips_blank_lines() -> None:
    f = LineFramer(100)
    assert f.feed(b"one\r\n\r\n\n   \ntwo\r") == [b"one"]
    assert f.feed(b"\nthree\n") == [b"two", b"three"]


def test_framer_limit_counts_bytes_before_the_newline() -> None:
    f = LineFramer(10)
    assert f.feed(b"0123456789\n") == [b"0123456789"]
    with pytest.raises(LineTooLong) as info:
        f.feed(b"ok\n0123456789A\n")
    assert info.value.lines == [b"ok"] and info.value.limit == 10


def test_framer_refuses_a_long_line_before_its_newline_arrives() -> None:
    f = LineFramer(10)
    assert f.feed(b"first\n01234") == [b"first"]
    with pytest.raises(LineTooLong) as info:
        f.feed(b"567890")  # 11 bytes buffered, no newline yet
    assert info.value.lines == []


def test_the_end_of_the_stream_ends_the_last_line() -> None:
    f = LineFramer(100)
    assert f.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert f.finish() == [b'{"b"']  # the stream ended: what was left is a line too
    assert f.buffered == 0 and f.finish() == []
    assert f.feed(b"two\r") == [] and f.finish() == [b"two"]
    assert f.feed(b"   ") == [] and f.finish() == []  # blank, as ever, is nothing
