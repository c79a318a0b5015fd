"""The daemon's error tree. Each class carries its JSON-RPC code.

    WangenError                 base; code -32603 unless a subclass says otherwise
    ├── InvalidParams           -32602  a field is wrong; `data` names it ({"field": "$.steps"})
    ├── Unauthorized            -32001  TCP connection has not sent a valid `auth`
    ├── UnknownJob              -32002  no job with that id
    ├── WrongState              -32003  the job or queue cannot do that now
    ├── ModelUnavailable        -32004  unknown model, or its files are missing/partial
    ├── ShuttingDown            -32005  the daemon is stopping and takes no new work
    ├── RequestTooLarge         -32006  a line over the size cap; the connection closes
    ├── StoreUnavailable        -32603  the queue database cannot be written (a full disk),
                                        said in words instead of a bare "Internal error"
    └── InvalidInput            -32007  reserved; input files are refused as InvalidParams,
                                        which names the field
    JobFailure                  raised inside a run; becomes the job's `error`, never an RPC error

The transport translates these at one boundary (server/rpc.py). Messages are single
human sentences and never carry tracebacks; anything else that escapes a method becomes a
bare -32603 "Internal error" and is logged, not sent.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .protocol import ErrorCode


class WangenError(Exception):
    code: int = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class InvalidParams(WangenError):
    code = ErrorCode.INVALID_PARAMS

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, {"field": field, "message": message} if field else None)
        self.field = field


class Unauthorized(WangenError):
    code = ErrorCode.UNAUTHORIZED


class UnknownJob(WangenError):
    code = ErrorCode.UNKNOWN_JOB

    def __init__(self, job: int) -> None:
        super().__init__(f"no job with id {job}", {"job": job})


class WrongState(WangenError):
    code = ErrorCode.WRONG_STATE

    @classmethod
    def of_job(cls, job: int, state: str, rule: str) -> WrongState:
        """ "job 3 has succeeded; only a failed or aborted job can be retried": the
        state in words a person would use, and `data` for scripts."""
        said = _STATE_WORDS.get(state, f"is {state}")
        return cls(f"job {job} {said}; {rule}", {"job": job, "state": state})


_STATE_WORDS = {"succeeded": "has succeeded", "failed": "has failed", "aborted": "was aborted"}


class ModelUnavailable(WangenError):
    code = ErrorCode.MODEL_UNAVAILABLE


class ShuttingDown(WangenError):
    code = ErrorCode.SHUTTING_DOWN


class RequestTooLarge(WangenError):
    code = ErrorCode.REQUEST_TOO_LARGE


class StoreUnavailable(WangenError):
    """The queue database refused a write (a full disk, a read-only file system). Nothing
    of the call took effect; the message says why, so a client can tell the user."""


class InvalidInput(WangenError):
    code = ErrorCode.INVALID_INPUT


class JobFailure(Exception):
    """A job could not finish. `kind` becomes JobError.type, the message JobError.message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def invalid_params_from(exc: msgspec.ValidationError, prefix: str = "$.params") -> InvalidParams:
    """Turn msgspec's "Expected `int` >= 1 - at `$.steps`" into InvalidParams whose data
    names the field as the client sent it (`$.params.steps`)."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:  # at the top level msgspec names no path
        message, where = text, "$`"
    path = where.rstrip("`")
    field = prefix + path[1:] if path.startswith("$") else path
    for marker in ("unknown field `", "missing required field `"):
        key = message.partition(marker)[2].rstrip("`")
        if key:  # name the offending key itself, not just the object holding it
            field = f"{field}.{key}"
            break
    return InvalidParams(message, field=field)
