"""Hostile clients against one real daemon over its Unix socket.

Whatever arrives (random bytes, invalid UTF-8, deep nesting, huge numbers, wrong types
in every field), every reply line is a valid JSON-RPC 2.0 response without internals,
and the daemon keeps serving. Connections dropped at any point cost it no memory.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ..support.harness import DaemonProcess
from .conftest import rss_kib

pytestmark = pytest.mark.slow

PROJECT = str(Path(__file__).resolve().parents[2])
EXAMPLES = 200
SENTINEL = "sentinel-status"
TRIED: dict[str, int] = {"inputs": 0, "replies": 0}

# A tiny valid job: any field an example leaves valid keeps the job cheap.
SMALL_JOB = {"prompt": "x", "steps": 1, "width": 16, "height": 16, "frames": 1}
FIELDS: dict[str, dict[str, Any]] = {
    "enqueue": {
        **SMALL_JOB,
        "model": "tiny",
        "negative_prompt": "",
        "guidance_scale": 1.0,
        "seed": 1,
        "fps": 8,
        "flow_shift": 1.0,
        "output_name": "h",
        "priority": 0,
        "kind": "generate",
    },
    "status": {"job": 1},
    "move": {"job": 1, "position": 0},
    "jobs": {"state": ["queued"], "limit": 5},
    "subscribe": {"since": 0, "jobs": [1]},
    "abort": {"job": 1},
    "retry": {"job": 1},
}
HUGE = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**300, -(10**300), 1e308, -1e308]


def _line(method: str, params: str, ident: str = "1") -> bytes:
    """A request written by hand, so it can hold what json.dumps never writes."""
    return ('{"jsonrpc":"2.0","id":' + ident + ',"method":"' + method + '","params":' + params
            + "}").encode()  # fmt: skip


def _nested(depth: int, value: Any = 1) -> str:
    return "[" * depth + json.dumps(value) + "]" * depth


hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HUGE),
    st.integers(min_value=-(2**70), max_value=-1001) | st.integers(min_value=10**7),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.sampled_from(["../x", "/etc/passwd", "a/b", "..", "\x00", "{job}/../../x", "."]),
)


@st.composite
def wrong_field(draw: st.DrawFn) -> bytes:
    """A request with one hostile value in one field of a method's params."""
    method = draw(st.sampled_from(sorted(FIELDS)))
    params = dict(FIELDS[method])
    field = draw(st.sampled_from(sorted(params)))
    params[field] = draw(hostile_values)
    if method == "jobs" and field == "state":
        params[field] = draw(st.one_of(hostile_values, st.lists(hostile_values, max_size=3)))
    request = {"jsonrpc": "2.0", "id": draw(st.integers(0, 10**6)), "method": method}
    request["params"] = params
    return json.dumps(request).encode()


@st.composite
def raw_text(draw: st.DrawFn) -> bytes:
    """Hand-made lines: deep nesting, huge literals, broken UTF-8, odd ids."""
    kind = draw(st.sampled_from(["deep", "deep_params", "number", "utf8", "id", "batch"]))
    depth = draw(st.integers(1, 200_000))
    if kind == "deep":
        return _nested(depth).encode()
    if kind == "deep_params":
        return _line("status", '{"job":' + _nested(depth) + "}")
    if kind == "number":
        digits = draw(st.integers(20, 100_000))
        where = draw(st.sampled_from(["id", "job", "since"]))
        number = "9" * digits + draw(st.sampled_from(["", ".5", "e999", "e-999"]))
        if where == "id":
            return _line("status", "{}", ident=number)
        method = "subscribe" if where == "since" else "status"
        return _line(method, '{"' + where + '":' + number + "}")
    if kind == "utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80"]))
        return b'{"jsonrpc":"2.0","id":1,"method":"st' + junk + b'atus"}'
    if kind == "id":
        ident = draw(st.sampled_from(["[1]", "{}", "true", "1.5", '"x"', "null", "-0"]))
        return _line("status", "{}", ident=ident)
    items = draw(st.lists(wrong_field(), min_size=1, max_size=5))
    return b"[" + b",".join(items) + b"]"


requests_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
).map(lambda value: json.dumps(value).encode())

payloads = st.one_of(
    st.binary(max_size=2048).map(lambda b: b.replace(b"\n", b" ")),
    wrong_field(),
    raw_text(),
    requests_json,
)


def check_reply(message: Any) -> None:
    """One JSON-RPC 2.0 response (or a batch of them)."""
    if isinstance(message, list):
        assert message, "an empty batch reply"
        for item in message:
            check_reply(item)
        return
    assert isinstance(message, dict), message
    if message.get("method") == "event":
        return  # a notification for a subscription the fuzzer happened to make
    assert message.get("jsonrpc") == "2.0", message
    assert "id" in message, message
    assert ("result" in message) != ("error" in message), message
    if "error" in message:
        assert type(message["error"]["code"]) is int, message
        assert isinstance(message["error"]["message"], str), message
        # a client's bad input is its own error, never the daemon's internal one
        assert message["error"]["code"] != -32603, message


@pytest.fixture(scope="module")
def quiet(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """Hold the queue, so jobs the fuzzer manages to enqueue never run; clear them after."""
    with daemon.unix() as client:
        client.result("pause", {"mode": "now"})
    yield daemon
    with daemon.unix() as client:
        client.result("clear")


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=payloads)
@example(payload=b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"job":9223372036854775808}}')
@example(payload=b'{"jsonrpc":"2.0","id":1,"method":"abort","params":{"job":18446744073709551615}}')
@example(payload=b'{"jsonrpc":"2.0","id":1,"method":"retry","params":{"job":9223372036854775808}}')
@example(
    payload=b'{"jsonrpc":"2.0","id":1,"method":"move","params":{"job":9223372036854775808,"position":0}}'
)
@example(
    payload=b'{"jsonrpc":"2.0","id":1,"method":"move","params":{"job":1,"position":18446744073709551615}}'
)
@example(
    payload=b'{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"jobs":[18446744073709551615]}}'
)
def test_every_reply_is_valid_json_rpc_without_internals(
    quiet: DaemonProcess, payload: bytes
) -> None:
    TRIED["inputs"] += 1
    with quiet.unix(timeout=20) as client:
        sentinel = {"jsonrpc": "2.0", "id": SENTINEL, "method": "status"}
        client.send_raw(payload + b"\n" + json.dumps(sentinel).encode() + b"\n")
        while True:
            line = client.read_line()
            text = line.decode("utf-8")  # replies are always UTF-8
            assert "Traceback" not in text and PROJECT not in text, text[:2000]
            assert 'File "' not in text and "site-packages" not in text, text[:2000]
            message = json.loads(line)
            check_reply(message)
            TRIED["replies"] += 1
            if isinstance(message, dict) and message.get("id") == SENTINEL:
                assert "result" in message, message
                break
    with quiet.unix() as client:
        assert client.result("status")["pid"] == quiet.proc.pid


def _connect(daemon: DaemonProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.socket))
    return sock


def test_oversize_line_then_disconnect(quiet: DaemonProcess) -> None:
    for _ in range(3):
        sock = _connect(quiet)
        with contextlib.suppress(OSError):  # the daemon may close first: that is the point
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status","params":"' + b"a" * 2**21)
        sock.close()
    with quiet.unix() as client:
        assert client.result("status")["pid"] == quiet.proc.pid


def test_half_a_line_then_disconnect(quiet: DaemonProcess) -> None:
    for cut in (1, 10, 30):
        sock = _connect(quiet)
        sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"enqueue","params":{"prompt":"x"}}'[:cut])
        sock.close()
    with quiet.unix() as client:
        assert client.result("status")["pid"] == quiet.proc.pid


def test_hundreds_of_dropped_connections_leave_memory_bounded(quiet: DaemonProcess) -> None:
    pid = quiet.proc.pid
    with quiet.unix() as client:  # warm up the paths the churn uses
        client.result("status")
    before = rss_kib(pid)
    opened = 0
    for round_ in range(6):
        socks = []
        for i in range(100):
            sock = _connect(quiet)
            opened += 1
            if i % 3 == 0:
                sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"sta')  # mid-line
            elif i % 3 == 1:
                sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
            socks.append(sock)
        for sock in socks:
            if round_ % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()
    with quiet.unix() as client:
        assert client.result("status")["pid"] == pid
    after = rss_kib(pid)
    TRIED.update(connections=opened, rss_before_kib=before, rss_after_kib=after)
    print(f"hostile: {TRIED}")
    assert opened >= 500
    assert after - before < 100 * 1024, (before, after)


def test_the_daemon_still_serves_over_tcp_too(quiet: DaemonProcess) -> None:
    with quiet.tcp() as client:
        assert client.result("status")["pid"] == quiet.proc.pid
