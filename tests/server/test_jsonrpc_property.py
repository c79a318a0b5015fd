"""Property: whatever line arrives, the dispatcher does not raise, and whatever it sends
back is valid JSON-RPC 2.0 that carries no internals."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wangend.errors import WrongState
from wangend.server.jsonrpc import Dispatcher, Method

pytestmark = pytest.mark.anyio

ENGINES = ["direct", "jsonrpcserver"]


class Pair(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: str = "x"


class Ctx:
    authenticated = False


def methods() -> list[Method]:
    async def pair(ctx: Ctx, p: Pair) -> Pair:
        return p

    async def crash(ctx: Ctx, p: Any) -> None:
        raise RuntimeError('Traceback (most recent call last): File "/srv/wangend/x.py"')

    async def refuse(ctx: Ctx, p: None) -> None:
        raise WrongState("not now")

    async def numbers(ctx: Ctx, p: list[int]) -> int:
        return len(p)

    return [
        Method("pair", pair, Pair, requires_auth=False, positional=True),
        Method("crash", crash, dict[str, Any], requires_auth=False),
        Method("refuse", refuse, requires_auth=False),
        Method("numbers", numbers, list[int], requires_auth=False),
        Method("private", refuse),
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0", 2.0, None]),
        "method": st.sampled_from(["pair", "crash", "refuse", "numbers", "private", "nope"])
        | json_values,
        "params": json_values
        | st.fixed_dictionaries({"a": st.integers() | st.text()}, optional={"b": json_values})
        | st.lists(st.integers(), max_size=3),
        "id": json_values,
    },
)


def mutate(data: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    for at, junk in cuts:
        i = at % (len(data) + 1)
        data = data[:i] + junk + data[i:]
    return data


lines = (
    st.binary(max_size=120)
    | json_values.map(lambda v: json.dumps(v).encode())
    | requests.map(lambda r: json.dumps(r).encode())
    | st.lists(requests | json_values, max_size=5).map(lambda b: json.dumps(b).encode())
    | st.tuples(
        requests.map(lambda r: json.dumps(r).encode()),
        st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=3)), max_size=2),
    ).map(lambda t: mutate(*t))
)


def check_response(r: Any) -> None:
    assert isinstance(r, dict) and r.get("jsonrpc") == "2.0", r
    assert set(r) in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}), r
    assert r["id"] is None or type(r["id"]) in (str, int, float), r
    if "error" in r:
        error = r["error"]
        assert type(error["code"]) is int and isinstance(error["message"], str), r
        assert set(error) <= {"code", "message", "data"}, r
        if error["code"] == -32603:
            assert error == {"code": -32603, "message": "Internal error"}, r


DISPATCHERS = {engine: Dispatcher(methods(), engine=engine) for engine in ENGINES}


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=lines)
async def test_any_line_gets_a_valid_reply_or_none(engine: str, line: bytes) -> None:
    reply = await DISPATCHERS[engine].handle_line(line, Ctx())
    if reply is None:
        return
    assert b"\n" not in reply  # one line on the wire
    text = reply.decode("utf-8")
    assert "Traceback" not in text and "/srv/wangend" not in text  # the crash's secrets
    decoded = json.loads(text)
    if isinstance(decoded, list):
        assert decoded, "an empty batch reply must not be sent"
        for r in decoded:
            check_response(r)
    else:
        check_response(decoded)
