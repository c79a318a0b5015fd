"""The daemon's wire protocol against the JSON-RPC 2.0 specification, over a real socket."""

from __future__ import annotations

import json

from ..support.harness import DaemonProcess
from ..support.wire import WireClient


def exchange(client: WireClient, text: str) -> object:
    client.send_raw(text.encode() + b"\n")
    return json.loads(client.read_line())


def test_spec_error_examples_and_the_connection_stays_usable(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        assert exchange(c, '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}') == {
            "jsonrpc": "2.0",
            "error": {"code": -32601, "message": "Method not found"},
            "id": "1",
        }
        reply = exchange(c, '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
        assert reply["error"]["code"] == -32700 and reply["id"] is None
        reply = exchange(c, '{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
        assert reply["error"]["code"] == -32600 and reply["id"] is None
        reply = exchange(c, "[]")
        assert reply["error"]["code"] == -32600
        replies = exchange(c, "[1,2,3]")
        assert [r["error"]["code"] for r in replies] == [-32600] * 3
        # still usable after all that
        assert c.result("status")["version"]


def test_batches_are_answered_element_by_element(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        replies = exchange(
            c,
            json.dumps(
                [
                    {"jsonrpc": "2.0", "method": "status", "id": 1},
                    {"jsonrpc": "2.0", "method": "status"},  # a notification: no reply
                    {"foo": "boo"},
                    {"jsonrpc": "2.0", "method": "nope", "id": "5"},
                    {"jsonrpc": "2.0", "method": "jobs", "params": {"limit": 0}, "id": 9},
                ]
            ),
        )
        by_id = {r["id"]: r for r in replies}
        assert len(replies) == 4
        assert "result" in by_id[1]
        assert by_id[None]["error"]["code"] == -32600
        assert by_id["5"]["error"]["code"] == -32601
        assert by_id[9]["error"]["code"] == -32602
        # a batch of notifications only gets no reply at all
        c.send_raw(b'[{"jsonrpc":"2.0","method":"status"},{"jsonrpc":"2.0","method":"nope"}]\n')
        assert c.result("status")["pid"] > 0


def test_invalid_params_name_the_field(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        error = c.call("enqueue", {"prompt": "x", "steps": 0})["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.steps"
        error = c.call("enqueue", {"prompt": "x", "stepz": 3})["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.stepz"
        error = c.call("enqueue", {"prompt": "x", "width": 50})["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.params.width"
        error = c.call("enqueue", {"steps": 3})["error"]
        assert error["code"] == -32602 and "prompt" in error["message"]
        error = c.call("enqueue", {"prompt": "x", "model": "no-such-model"})["error"]
        assert error["code"] == -32004
        assert c.call("status", {"job": 999999})["error"]["code"] == -32002


def test_internal_details_never_leak(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        for raw in (
            b'{"jsonrpc":"2.0","id":1,"method":"enqueue","params":{"prompt":"x","seed":-1}}',
            b'{"jsonrpc":"2.0","id":2,"method":"move","params":{"job":"a","position":1}}',
            b"\xff\xfe{}",  # not UTF-8
            b'{"jsonrpc":"2.0","id":3,"method":"status","params":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
        ):
            c.send_raw(raw + b"\n")
            flat = c.read_line().decode()
            assert "error" in flat
            assert "Traceback" not in flat and "/wangend/" not in flat and ".py" not in flat


def test_an_oversize_line_is_refused_and_the_connection_closed(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        c.send_raw(
            b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":"'
            + b"a" * (1024 * 1024 + 10)
            + b'"}}\n'
        )
        reply = json.loads(c.read_line())
        assert reply["error"]["code"] == -32006
        try:
            c.read_line()
            closed = False
        except (ConnectionError, OSError):
            closed = True
        assert closed
    with daemon.unix() as other:  # the daemon itself is fine
        assert other.result("status")["pid"] > 0


def test_resync_with_since_misses_nothing(daemon: DaemonProcess) -> None:
    with daemon.unix() as c:
        since = c.result("status")["last_seq"]
    with daemon.unix() as c:  # a client that is not subscribed while the job runs
        job = c.result("enqueue", {"prompt": "while away", "steps": 2})["job"]
        c.result("subscribe", {"jobs": [job]})
        c.wait_event(lambda e: e.get("job") == job and e["type"] == "job.succeeded")
    with daemon.unix() as c:  # comes back later and asks from where it left
        reply = c.result("subscribe", {"since": since, "jobs": [job]})
        assert reply["complete"] is True and reply["replayed"] >= 4
        replayed = [c.next_event() for _ in range(reply["replayed"])]
    types = [e["type"] for e in replayed]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.succeeded"
    seqs = [e["seq"] for e in replayed]
    assert seqs == sorted(seqs) and all(s > since for s in seqs)
