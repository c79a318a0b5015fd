"""The sans-IO dispatcher against the JSON-RPC 2.0 specification, with no socket at all.

JSONRPC_SPEC_EXAMPLES is every example of the specification's "Examples" section, run
through a Dispatcher holding the example methods; the replies must match exactly (batch
replies in request order, which the dispatcher guarantees).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec
import pytest

from wangend.errors import UnknownJob
from wangend.server.jsonrpc import Dispatcher, Method

ENGINES = ["jsonrpcserver", "direct"]


class Ctx:
    def __init__(self, authenticated: bool = True) -> None:
        self.authenticated = authenticated
        self.calls: list[tuple[str, Any]] = []


class SubtractParams(msgspec.Struct, forbid_unknown_fields=True):
    minuend: int
    subtrahend: int


def example_methods() -> list[Method]:
    async def subtract(ctx: Ctx, p: SubtractParams) -> int:
        return p.minuend - p.subtrahend

    async def sum_(ctx: Ctx, p: list[int]) -> int:
        return sum(p)

    async def record(ctx: Ctx, p: Any) -> None:
        ctx.calls.append(("notification", p))

    async def get_data(ctx: Ctx, p: None) -> list[Any]:
        return ["hello", 5]

    return [
        Method("subtract", subtract, SubtractParams, positional=True),
        Method("sum", sum_, list[int]),
        Method("update", record, list[int]),
        Method("notify_hello", record, list[int]),
        Method("notify_sum", record, list[int]),
        Method("get_data", get_data),
    ]


def err(code: int, message: str, id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id}


def ok(result: Any, id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "result": result, "id": id}


MIXED_BATCH = """[
    {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
    {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
    {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
    {"foo": "boo"},
    {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
    {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
]"""

# (name, request text, expected reply or None for "no reply at all")
JSONRPC_SPEC_EXAMPLES: list[tuple[str, str, Any]] = [
    (
        "positional subtract",
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        ok(19, 1),
    ),
    (
        "positional subtract, reversed",
        '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
        ok(-19, 2),
    ),
    (
        "named subtract",
        '{"jsonrpc": "2.0", "method": "subtract", '
        '"params": {"subtrahend": 23, "minuend": 42}, "id": 3}',
        ok(19, 3),
    ),
    (
        "named subtract, other order",
        '{"jsonrpc": "2.0", "method": "subtract", '
        '"params": {"minuend": 42, "subtrahend": 23}, "id": 4}',
        ok(19, 4),
    ),
    (
        "notification update",
        '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}',
        None,
    ),
    ("notification foobar", '{"jsonrpc": "2.0", "method": "foobar"}', None),
    (
        "non-existent method",
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        err(-32601, "Method not found", "1"),
    ),
    (
        "invalid JSON",
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        err(-32700, "Parse error"),
    ),
    (
        "invalid Request object",
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        err(-32600, "Invalid Request"),
    ),
    (
        "batch, invalid JSON",
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method"]',
        err(-32700, "Parse error"),
    ),
    ("empty array", "[]", err(-32600, "Invalid Request")),
    ("invalid batch [1]", "[1]", [err(-32600, "Invalid Request")]),
    ("invalid batch [1,2,3]", "[1,2,3]", [err(-32600, "Invalid Request")] * 3),
    (
        "mixed batch",
        MIXED_BATCH,
        [
            ok(7, "1"),
            ok(19, "2"),
            err(-32600, "Invalid Request"),
            err(-32601, "Method not found", "5"),
            ok(["hello", 5], "9"),
        ],
    ),
    (
        "all-notification batch",
        '[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]',
        None,
    ),
]


@pytest.fixture(params=ENGINES)
def dispatcher(request: pytest.FixtureRequest) -> Dispatcher:
    return Dispatcher(example_methods(), engine=request.param)


async def answer(d: Dispatcher, text: str | bytes, ctx: Ctx | None = None) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    reply = await d.handle_line(raw, ctx or Ctx())
    return None if reply is None else json.loads(reply)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_text", "expected"),
    [(text, expected) for _, text, expected in JSONRPC_SPEC_EXAMPLES],
    ids=[name for name, _, _ in JSONRPC_SPEC_EXAMPLES],
)
async def test_jsonrpc_spec_examples(dispatcher: Dispatcher, request_text: str, expected: Any):
    assert await answer(dispatcher, request_text) == expected


@pytest.mark.anyio
async def test_notifications_run_but_are_never_answered(dispatcher: Dispatcher) -> None:
    ctx = Ctx()
    assert await answer(dispatcher, '{"jsonrpc":"2.0","method":"update","params":[1]}', ctx) is None
    assert ctx.calls == [("notification", [1])]
    # errors of a notification are not answered either
    bad_params = '{"jsonrpc":"2.0","method":"subtract","params":{"minuend":"x"}}'
    assert await answer(dispatcher, bad_params, ctx) is None


# --- params -----------------------------------------------------------------------------


class StepsParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prompt: str
    steps: int = msgspec.field(default=4)


def param_methods() -> list[Method]:
    async def echo(ctx: Ctx, p: StepsParams) -> StepsParams:
        return p

    async def nothing(ctx: Ctx, p: None) -> dict[str, bool]:
        return {"ok": p is None}

    return [Method("echo", echo, StepsParams), Method("nothing", nothing)]


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
async def test_invalid_params_name_the_field(engine: str) -> None:
    d = Dispatcher(param_methods(), engine=engine)
    reply = await answer(
        d, '{"jsonrpc":"2.0","id":1,"method":"echo","params":{"prompt":"a","steps":"x"}}'
    )
    assert reply["id"] == 1 and reply["error"]["code"] == -32602
    assert reply["error"]["data"]["field"] == "$.params.steps"
    assert "int" in reply["error"]["data"]["message"]
    reply = await answer(
        d, '{"jsonrpc":"2.0","id":2,"method":"echo","params":{"prompt":"a","stepz":1}}'
    )
    assert reply["error"]["data"]["field"] == "$.params.stepz"
    reply = await answer(d, '{"jsonrpc":"2.0","id":3,"method":"echo","params":{"steps":1}}')
    assert reply["error"]["code"] == -32602 and "prompt" in reply["error"]["message"]
    # by position is refused clearly for a by-name method
    reply = await answer(d, '{"jsonrpc":"2.0","id":4,"method":"echo","params":["a", 3]}')
    assert reply["error"]["code"] == -32602 and "by name" in reply["error"]["message"]
    assert await answer(
        d, '{"jsonrpc":"2.0","id":5,"method":"echo","params":{"prompt":"a"}}'
    ) == ok({"prompt": "a", "steps": 4}, 5)


@pytest.mark.anyio
@pytest.mark.parametrize("params", ["", ',"params":{}', ',"params":[]', ',"params": { } '])
async def test_a_method_without_params_takes_none_empty_object_or_array(params: str) -> None:
    d = Dispatcher(param_methods())
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"nothing"' + params + "}")
    assert reply == ok({"ok": True}, 1)


@pytest.mark.anyio
async def test_params_given_to_a_method_without_params_name_the_field() -> None:
    d = Dispatcher(param_methods())
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"nothing","params":{"a":1}}')
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == "$.params.a"
    assert "takes no params" in reply["error"]["message"]
    reply = await answer(d, '{"jsonrpc":"2.0","id":2,"method":"nothing","params":[7]}')
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == "$.params[0]"


@pytest.mark.anyio
async def test_positional_params_too_many_and_wrong_type() -> None:
    d = Dispatcher(example_methods())
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"subtract","params":[1,2,3]}')
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == "$.params[2]"
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"subtract","params":[1,"b"]}')
    assert reply["error"]["data"]["field"] == "$.params.subtrahend"
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"subtract","params":[1]}')
    assert reply["error"]["code"] == -32602 and "subtrahend" in reply["error"]["message"]


# --- envelope -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"jsonrpc":"1.0","method":"get_data","id":7}', err(-32600, "Invalid Request", 7)),
        ('{"method":"get_data","id":7}', err(-32600, "Invalid Request", 7)),
        ('{"jsonrpc":"2.0","method":"get_data","id":{"a":1}}', err(-32600, "Invalid Request")),
        ('{"jsonrpc":"2.0","method":"get_data","id":true}', err(-32600, "Invalid Request")),
        (
            '{"jsonrpc":"2.0","method":"get_data","params":"x","id":7}',
            err(-32600, "Invalid Request", 7),
        ),
        (
            '{"jsonrpc":"2.0","method":"get_data","params":null,"id":7}',
            err(-32600, "Invalid Request", 7),
        ),
        ('{"jsonrpc":"2.0","method":"get_data","id":null}', ok(["hello", 5], None)),
        ('{"jsonrpc":"2.0","method":"get_data","id":1.5}', ok(["hello", 5], 1.5)),
        ('"just a string"', err(-32600, "Invalid Request")),
        ("42 trailing", err(-32700, "Parse error")),
        ("1e400", err(-32700, "Parse error")),
        ('{"jsonrpc":"2.0","method":"get_data","id":1} x', err(-32700, "Parse error")),
        ("[" * 5000 + "]" * 5000, err(-32700, "Parse error")),
        ("[1, {bad]", err(-32700, "Parse error")),
    ],
)
async def test_envelope_checks(text: str, expected: Any) -> None:
    assert await answer(Dispatcher(example_methods()), text) == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b'{"jsonrpc":"2.0","method":"get_data","id":"\xff"}',
        b'{"jsonrpc":"2.0","method":"sum","params":["\xc3"],"id":1}',
        b'[{"jsonrpc":"2.0","method":"get_data","id":1},"\xe2\x82"]',
    ],
)
async def test_invalid_utf8_is_a_parse_error(raw: bytes) -> None:
    ctx = Ctx()
    assert await answer(Dispatcher(example_methods()), raw, ctx) == err(-32700, "Parse error")
    assert ctx.calls == []


@pytest.mark.anyio
async def test_a_batch_with_an_undecodable_element_runs_nothing() -> None:
    ctx = Ctx()
    text = '[{"jsonrpc":"2.0","method":"update","params":[1]}, 1e400]'
    assert await answer(Dispatcher(example_methods()), text, ctx) == err(-32700, "Parse error")
    assert ctx.calls == []


# --- errors from methods ----------------------------------------------------------------------


def failing_methods() -> list[Method]:
    async def boom(ctx: Ctx, p: None) -> None:
        raise RuntimeError("secret path /home/user/wangend/thing.py")

    async def unknown(ctx: Ctx, p: None) -> None:
        raise UnknownJob(42)

    async def unencodable(ctx: Ctx, p: None) -> object:
        return object()

    async def public(ctx: Ctx, p: None) -> str:
        return "hi"

    return [
        Method("boom", boom),
        Method("unknown", unknown),
        Method("unencodable", unencodable),
        Method("public", public, requires_auth=False),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
async def test_internal_errors_carry_nothing(engine: str, caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher(failing_methods(), engine=engine)
    with caplog.at_level(logging.ERROR, logger="wangend.rpc"):
        reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"boom"}')
    assert reply == err(-32603, "Internal error", 1)
    assert "secret path" in caplog.text and "RuntimeError" in caplog.text  # logged, not sent
    assert await answer(d, '{"jsonrpc":"2.0","id":2,"method":"unencodable"}') == err(
        -32603, "Internal error", 2
    )


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
async def test_a_wangen_error_keeps_its_code_message_and_data(engine: str) -> None:
    d = Dispatcher(failing_methods(), engine=engine)
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"unknown"}')
    assert reply["error"] == {"code": -32002, "message": "no job with id 42", "data": {"job": 42}}


@pytest.mark.anyio
async def test_unauthenticated_context_gets_32001_for_every_name_but_the_open_ones() -> None:
    d = Dispatcher(failing_methods())
    guest = Ctx(authenticated=False)
    reply = await answer(d, '{"jsonrpc":"2.0","id":1,"method":"boom"}', guest)
    assert reply["error"]["code"] == -32001
    # an unknown name too: a guest must not learn which methods exist
    reply = await answer(d, '{"jsonrpc":"2.0","id":2,"method":"nope"}', guest)
    assert reply["error"]["code"] == -32001 and reply["id"] == 2
    assert await answer(d, '{"jsonrpc":"2.0","id":3,"method":"public"}', guest) == ok("hi", 3)
    # once in, the unknown name is what it is
    reply = await answer(d, '{"jsonrpc":"2.0","id":4,"method":"nope"}')
    assert reply["error"]["code"] == -32601


# --- bounds: batch size, reply size ----------------------------------------------------------


@pytest.mark.anyio
async def test_a_batch_over_the_cap_is_one_error_and_runs_nothing() -> None:
    ctx = Ctx()
    d = Dispatcher(example_methods())
    assert d.max_batch == 1000
    call = '{"jsonrpc":"2.0","method":"update","params":[1]}'
    reply = await answer(d, "[" + ",".join([call] * 1001) + "]", ctx)
    assert reply["id"] is None and reply["error"]["code"] == -32600
    assert reply["error"]["data"] == {"limit": 1000}
    assert "at most 1000" in reply["error"]["message"] and "1001" in reply["error"]["message"]
    assert ctx.calls == []  # not one element ran
    # the audit's 1 MiB line of `[1,1,...]`: one small reply, not 40 MB of them
    flood = b"[" + b",".join([b"1"] * 524_287) + b"]"
    raw = await d.handle_line(flood, Ctx(authenticated=False))
    assert raw is not None and len(raw) < 300
    # at the cap, every element is answered
    replies = await answer(d, "[" + ",".join(["1"] * 1000) + "]")
    assert [r["error"]["code"] for r in replies] == [-32600] * 1000


@pytest.mark.anyio
async def test_before_auth_a_batch_is_an_array_of_32001_and_runs_nothing() -> None:
    ctx = Ctx(authenticated=False)
    d = Dispatcher([*example_methods(), *failing_methods()])
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "sum", "params": [1, 2]},
        {"jsonrpc": "2.0", "method": "update", "params": [1]},  # a notification: silent
        {"jsonrpc": "2.0", "id": 3, "method": "no.such"},
        {"jsonrpc": "2.0", "id": 4, "method": "public"},
    ]
    replies = await answer(d, json.dumps(batch), ctx)
    assert [(r["id"], r.get("error", {}).get("code")) for r in replies] == [
        (1, -32001),
        (3, -32001),
        (4, None),
    ]
    assert ctx.calls == []


def sized_methods() -> list[Method]:
    async def blob(ctx: Ctx, p: list[int]) -> str:
        return "x" * p[0]

    async def count(ctx: Ctx, p: None) -> int:
        ctx.calls.append(("count", None))
        return len(ctx.calls)

    return [Method("blob", blob, list[int]), Method("count", count)]


@pytest.mark.anyio
async def test_a_reply_over_the_limit_becomes_32006_with_its_id() -> None:
    d = Dispatcher(sized_methods())
    ctx = Ctx()

    async def ask(text: str) -> Any:
        raw = await d.handle_line(text.encode(), ctx, reply_limit=10_000)
        return json.loads(raw) if raw is not None else None

    assert (await ask('{"jsonrpc":"2.0","id":1,"method":"blob","params":[9000]}'))["result"]
    reply = await ask('{"jsonrpc":"2.0","id":2,"method":"blob","params":[20000]}')
    assert reply["id"] == 2 and reply["error"]["code"] == -32006
    size = len('{"jsonrpc":"2.0","id":2,"result":""}') + 20_000
    assert reply["error"]["data"] == {"limit": 10_000, "size": size}
    # in a batch the limit is for all replies together; every element still runs, and
    # the ones that no longer fit say so with their own id
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "blob", "params": [6000]},
        {"jsonrpc": "2.0", "id": "b", "method": "blob", "params": [6000]},
        {"jsonrpc": "2.0", "id": "c", "method": "count"},
    ]
    replies = await ask(json.dumps(batch))
    assert [r["id"] for r in replies] == ["a", "b", "c"]
    assert "result" in replies[0] and replies[1]["error"]["code"] == -32006
    assert replies[2]["result"] == 1 and ctx.calls == [("count", None)]
    assert len(json.dumps(replies)) < 10_000 + 500


def test_method_names_are_unique() -> None:
    methods = failing_methods()
    with pytest.raises(ValueError, match="share a name"):
        Dispatcher([*methods, methods[0]])
    assert Dispatcher({m.name: m for m in methods}).methods == tuple(m.name for m in methods)
