"""How answers and events look: tables and progress bars for people, NDJSON for programs.

cli.py decides what to ask the daemon; a `Renderer` decides how the answer is shown, so
the command bodies hold no formatting and `--json` is one switch, not a branch per
command.

People (`HumanRenderer`): data on stdout (a job id, output paths, tables), progress and
notices on stderr. So `JOB=$(wangenctl submit ...)` captures the id and
`OUT=$(wangenctl submit --follow ...)` captures only the paths: a followed job's id is
said on stderr with its progress, which the terminal still shows. Live bars need a
terminal; elsewhere (logs, pipes) each phase change is one plain line (progress_view.py
draws both).

Programs (`JsonRenderer`): every result, record and event is one compact JSON object
per line on stdout, encoded by msgspec straight from the protocol Structs; lists (`list`,
`models`) are one line per item so `jq` and line-by-line readers need no framing. A
`job.progress` event's preview JPEG is the one thing left out: its base64 `data` becomes
`bytes` (the JPEG's size), so a log of events stays small; `--save-previews DIR` keeps the
images, and the raw event stream still carries them.

Failures: a person gets one `error: ...` line on stderr. With `--json` stdout also gets
one `{"error": {...}}` object (`ErrorReport`), so a program reading stdout learns why
the command failed without parsing text; an RpcError keeps the daemon's code, message
and data exactly as sent. stderr stays for people in both modes.

rich is imported only when something is drawn: `wangenctl --json ...` never loads it.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from wangend.protocol import (
    TERMINAL_STATES,
    ClearResult,
    EnqueueResult,
    Event,
    JobRecord,
    LorasResult,
    ModelInfo,
    MoveResult,
    PresetsResult,
    QueueStateResult,
    ResolvedGenerate,
    ResolvedJob,
    ResolvedMatAnyOne,
    StatusResult,
    ValidateResult,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ErrorReport",
    "EventView",
    "HumanRenderer",
    "JsonRenderer",
    "Renderer",
    "error_report",
    "format_seconds",
    "make_renderer",
]

TERMINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.aborted"})


def format_seconds(seconds: float | None) -> str:
    """`8s`, `3m04s`, `1h02m`: short enough for a progress column."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_bytes(size: int) -> str:
    """`812 KB`, `2.4 GB`: decimal units, as disks and the hub count them."""
    if size < 1_000_000:
        return f"{size / 1000:.0f} KB"
    if size < 1_000_000_000:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1e9:.1f} GB"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _without_preview_data(event: Event) -> Event:
    """The event as shown: a preview keeps its step, size and shape, not its base64."""
    preview = event.data.get("preview")
    if event.type != "job.progress" or not isinstance(preview, dict) or "data" not in preview:
        return event
    shown = {k: v for k, v in preview.items() if k != "data"}
    shown["bytes"] = len(str(preview["data"])) * 3 // 4 - str(preview["data"]).count("=")
    return msgspec.structs.replace(event, data={**event.data, "preview": shown})


def _error_text(data: dict[str, Any]) -> str:
    error = data.get("error") or {}
    if isinstance(error, dict):
        return f"{error.get('type', 'Error')}: {error.get('message', '')}".rstrip(": ")
    return str(error)


class ErrorReport(msgspec.Struct, kw_only=True):
    """Why a command failed, as `--json` prints it on stdout: `{"error": {...}}`.

    `type` says which kind of failure (DaemonUnavailable, AuthError, RpcError,
    ProtocolError, NoSettings, QueueImportError, UsageError); `code`, `message` and `data`
    are the JSON-RPC error object for an RpcError, untouched, and `message` is the line a
    person reads otherwise; `exit` is the exit status that follows.
    """

    type: str
    message: str
    code: int | None = None
    data: Any = None
    exit: int


def error_report(error: BaseException, exit: int) -> ErrorReport:
    """The report of an exception; click's usage errors all count as "UsageError"."""
    from typer import TyperException

    from .errors import RpcError

    if isinstance(error, RpcError):
        return ErrorReport(
            type="RpcError", message=error.message, code=error.code, data=error.data, exit=exit
        )
    if isinstance(error, TyperException):
        return ErrorReport(type="UsageError", message=error.format_message(), exit=exit)
    return ErrorReport(type=type(error).__name__, message=str(error), exit=exit)


class _ErrorLine(msgspec.Struct):
    error: ErrorReport


class EventView(Protocol):
    """Shows a stream of events; a context manager so live displays are torn down."""

    def __enter__(self) -> EventView: ...
    def __exit__(self, *exc: object) -> None: ...
    def seed(self, record: JobRecord) -> None: ...
    def event(self, event: Event) -> None: ...
    def notice(self, text: str) -> None: ...


class Renderer(Protocol):
    def enqueued(self, result: EnqueueResult) -> None: ...
    def following(self, result: EnqueueResult) -> None: ...
    def status(self, result: StatusResult) -> None: ...
    def job(self, record: JobRecord) -> None: ...
    def jobs(self, records: list[JobRecord]) -> None: ...
    def models(self, models: list[ModelInfo]) -> None: ...
    def queue_state(self, result: QueueStateResult) -> None: ...
    def aborted(self, record: JobRecord, *, followed: bool = False) -> None: ...
    def cleared(self, result: ClearResult) -> None: ...
    def moved(self, result: MoveResult) -> None: ...
    def stopping(self, mode: str) -> None: ...
    def finished(self, record_or_event: JobRecord | Event) -> None: ...
    def notice(self, text: str) -> None: ...
    def error(self, text: str, report: ErrorReport) -> None: ...
    def events(self, job: int | None) -> EventView: ...
    def validated(self, result: ValidateResult) -> None: ...
    def loras(self, result: LorasResult) -> None: ...
    def presets(self, result: PresetsResult) -> None: ...
    def settings(self, path: str, document: dict[str, Any]) -> None: ...


def make_renderer(json_mode: bool) -> Renderer:
    return JsonRenderer() if json_mode else HumanRenderer()


# --- NDJSON -----------------------------------------------------------------------------


class JsonRenderer:
    """One JSON object per line on stdout; notices stay on stderr as text, and an error is
    both an object on stdout and its line on stderr."""

    def __init__(self) -> None:
        self._encode = msgspec.json.Encoder().encode

    def emit(self, obj: Any) -> None:
        sys.stdout.write(self._encode(obj).decode() + "\n")
        sys.stdout.flush()

    def enqueued(self, result: EnqueueResult) -> None:
        self.emit(result)

    def following(self, result: EnqueueResult) -> None:
        # The reply, then the job's events: a program learns the id from the first line.
        self.emit(result)

    def status(self, result: StatusResult) -> None:
        self.emit(result)

    def job(self, record: JobRecord) -> None:
        self.emit(record)

    def jobs(self, records: list[JobRecord]) -> None:
        for record in records:
            self.emit(record)

    def models(self, models: list[ModelInfo]) -> None:
        for model in models:
            self.emit(model)

    def queue_state(self, result: QueueStateResult) -> None:
        self.emit(result)

    def aborted(self, record: JobRecord, *, followed: bool = False) -> None:
        self.emit(record)

    def cleared(self, result: ClearResult) -> None:
        self.emit(result)

    def moved(self, result: MoveResult) -> None:
        self.emit(result)

    def stopping(self, mode: str) -> None:
        self.emit({"ok": True, "mode": mode})

    def finished(self, record_or_event: JobRecord | Event) -> None:
        # A followed job's end was already printed as its event; a record (the job had
        # ended before `watch` started) is printed whole.
        if isinstance(record_or_event, JobRecord):
            self.emit(record_or_event)

    def notice(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def error(self, text: str, report: ErrorReport) -> None:
        # The person's line first: when stdout is already closed, writing the object
        # ends the command (cli.py), and the reason must not go down with it.
        print(f"error: {text}", file=sys.stderr, flush=True)
        self.emit(_ErrorLine(report))

    def events(self, job: int | None) -> EventView:
        return _JsonEvents(self)

    def validated(self, result: ValidateResult) -> None:
        self.emit(result)

    def loras(self, result: LorasResult) -> None:
        self.emit(result)

    def presets(self, result: PresetsResult) -> None:
        self.emit(result)

    def settings(self, path: str, document: dict[str, Any]) -> None:
        self.emit({"path": path, **document})


class _JsonEvents:
    def __init__(self, out: JsonRenderer) -> None:
        self._out = out

    def __enter__(self) -> _JsonEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def seed(self, record: JobRecord) -> None:
        self._out.emit(record)

    def event(self, event: Event) -> None:
        self._out.emit(_without_preview_data(event))

    def notice(self, text: str) -> None:
        self._out.notice(text)


# --- people --------------------------------------------------------------------------------


@cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class PipeConsole(Console):
        """A Console that lets a closed pipe surface as BrokenPipeError.

        rich's own answer (its documented `on_broken_pipe` hook) is `SystemExit(1)`, which
        no `except Exception` stops: inside the client's task group it came out as an
        exception group with a traceback. As a BrokenPipeError it reaches cli.py, which
        ends every command the same quiet way whoever wrote to the pipe.
        """

        def on_broken_pipe(self) -> None:
            self.quiet = True  # whatever is still printed on the way out goes nowhere
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return PipeConsole


def _console(**options: Any) -> Console:
    return _console_class()(**options)


class HumanRenderer:
    """rich tables on stdout; notices, errors and progress on stderr."""

    def __init__(self) -> None:
        self._announced: set[int] = set()  # followed jobs whose id `following` said

    @cached_property
    def out(self) -> Console:
        console = _console(highlight=False)
        if not console.is_terminal:
            # Piped into a file or `less`: rows whole, not folded at a guessed 80 columns.
            console = _console(highlight=False, width=1000)
        return console

    @cached_property
    def err(self) -> Console:
        # soft_wrap: an error or notice is one line however narrow the terminal.
        return _console(stderr=True, highlight=False, soft_wrap=True)

    def line(self, text: str) -> None:
        """One line of data on stdout, never wrapped (paths must survive copy and paste)."""
        self.out.print(text, markup=False, soft_wrap=True)

    def enqueued(self, result: EnqueueResult) -> None:
        self.line(str(result.job))

    def following(self, result: EnqueueResult) -> None:
        # stdout is kept for the paths (`OUT=$(wangenctl submit -f ...)`); the id is said
        # here, and the view leaves out the job.queued event that would say it again.
        self.err.print(f"job {result.job} queued at position {result.position}", markup=False)
        self._announced.add(result.job)

    def status(self, result: StatusResult) -> None:
        q = result.queue
        if result.paused:
            held = "after the current job" if result.pause_mode == "after_current" else "now"
            state = f"paused ({held})"
            if result.pause_reason:  # the daemon paused it: say why, and what ends it
                state += f": {result.pause_reason}; fix it, then `wangenctl resume`"
        else:
            state = "running"
        rows = [
            (
                "daemon",
                f"wangend {result.version}, pid {result.pid}, up {format_seconds(result.uptime)}",
            ),
            ("device", result.device),
            ("model", f"{result.model} (warm)" if result.model else "none loaded"),
            ("queue", state),
            (
                "jobs",
                f"{q.queued} queued, {q.running} running, {q.paused} paused, "
                f"{q.succeeded} succeeded, {q.failed} failed, {q.aborted} aborted",
            ),
        ]
        run = result.running
        if run is not None:
            steps = f"{run.step}/{run.steps}" if run.steps else "-"
            # A held job has no time left to count down: no eta until it resumes.
            eta = "" if run.state == "paused" else f", eta {format_seconds(run.eta)}"
            rows.append(
                ("running", f"job {run.job} ({run.model}) {run.state}, {run.phase} {steps}{eta}")
            )
        else:
            rows.append(("running", "nothing"))
        self._grid(rows)

    def job(self, record: JobRecord) -> None:
        progress = record.progress
        rows = [("job", str(record.id)), ("state", record.state), *_spec_rows(record.spec)]
        rows += [("priority", str(record.priority)), ("attempts", str(record.attempts))]
        if progress is not None and record.state not in TERMINAL_STATES:
            eta = "" if record.state == "paused" else f", eta {format_seconds(progress.eta)}"
            rows.append(("progress", f"{progress.phase} {progress.step}/{progress.steps}{eta}"))
        if record.resume_step is not None:
            steps = record.spec.steps if isinstance(record.spec, ResolvedGenerate) else "?"
            rows.append(("resumes", f"after step {record.resume_step}/{steps} (its resume point)"))
        if record.retry_of is not None:
            rows.append(("retry of", str(record.retry_of)))
        rows += [
            ("created", _when(record.created_at)),
            ("started", _when(record.started_at)),
            ("finished", _when(record.finished_at)),
        ]
        rows += [("output", path) for path in record.outputs]
        if record.error is not None:
            rows.append(("error", f"{record.error.type}: {record.error.message}"))
        self._grid(rows)

    def jobs(self, records: list[JobRecord]) -> None:
        from rich.table import Table

        if not records:
            self.err.print("no jobs", markup=False)
            return
        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in ("ID", "STATE", "MODEL", "PROGRESS", "CREATED", "PROMPT", "RESULT"):
            table.add_column(name, no_wrap=name != "PROMPT" and name != "RESULT", overflow="fold")
        for r in records:
            p = r.progress
            progress = (
                f"{p.phase} {p.step}/{p.steps}" if p and r.state in ("running", "paused") else "-"
            )
            if r.resume_step is not None:
                progress = f"resumes after {r.resume_step}"
            result = ", ".join(r.outputs) or (r.error.message if r.error else "")
            table.add_row(
                str(r.id),
                r.state,
                r.spec.model,
                progress,
                _when(r.created_at),
                _clip(_subject(r.spec), 40),
                result,
            )
        self.out.print(table)

    def models(self, models: list[ModelInfo]) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in ("NAME", "FAMILY", "STATUS", "DESCRIPTION"):
            table.add_column(name, overflow="fold")
        for m in models:
            # A model that does not resolve is listed with family "unknown" and the reason.
            missing = "unusable" if m.family == "unknown" else "not on disk"
            flags = ["loaded" if m.loaded else "available" if m.available else missing]
            if m.default:
                flags.append("default")
            about = m.description or m.source
            if m.files:  # a file model: its files, whatever its description says
                about += f" ({', '.join(f'{k}: {v}' for k, v in m.files.items())})"
            # Plain text, not rich markup: "[models.*]" or a user's "[v2]" must show.
            table.add_row(*(Text(cell) for cell in (m.name, m.family, ", ".join(flags), about)))
        self.out.print(table)

    def validated(self, result: ValidateResult) -> None:
        """A dry run: what would be queued, then the plan."""
        import msgspec

        self.line("valid: nothing was queued")
        self._pairs(msgspec.to_builtins(result.spec))
        if result.plan:
            self.line("plan:")
            self._pairs(result.plan, indent="  ")

    def loras(self, result: LorasResult) -> None:
        from rich.table import Table

        self.line(f"LoRAs for {result.family} in {', '.join(result.folders) or '(no folders)'}")
        if not result.loras:
            self.line("(none)")
        else:
            table = Table(box=None, header_style="bold", pad_edge=False)
            for name in ("NAME", "FORMAT", "RANK", "SIZE", "PROBLEM"):
                table.add_column(name, overflow="fold")
            for lora in result.loras:
                rank = "" if lora.rank is None else str(lora.rank)
                table.add_row(
                    lora.name, lora.format, rank, _format_bytes(lora.size), lora.error or ""
                )
            self.out.print(table)
        if result.state is not None:
            self.line("loaded in the warm pipeline:")
            self._pairs(result.state, indent="  ")

    def presets(self, result: PresetsResult) -> None:
        from rich.table import Table

        self.line(f"presets in {', '.join(result.folders) or '(no folders)'}")
        if not result.presets:
            self.line("(none)")
            return
        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in ("NAME", "LORAS", "PROMPT", "PROBLEM"):
            table.add_column(name, overflow="fold")
        for preset in result.presets:
            loras = " ".join(f"{r.name}:{r.multiplier}" for r in preset.loras)
            table.add_row(preset.name, loras, _clip(preset.prompt or "", 40), preset.error or "")
        self.out.print(table)

    def settings(self, path: str, document: dict[str, Any]) -> None:
        settings = document.get("settings") or {}
        made = document.get("created_at", "?")
        self.line(f"{path}: made by wangend {document.get('wangend', '?')} at {made}")
        if document.get("job") is not None:
            self.line(f"job {document['job']} on {document.get('device', '?')}")
        for note in document.get("notes") or ():  # fallbacks taken, "resumed after step K"
            self.line(f"note: {note}")
        audio = document.get("audio")
        if isinstance(audio, dict) and audio.get("error"):
            self.line(f"note: audio from {audio.get('source', '?')} left out: {audio['error']}")
        # One column for the settings and the frames' hash alike.
        self._pairs({**settings, "frames_sha256": document.get("frames_sha256")})

    def _pairs(self, values: dict[str, Any], indent: str = "") -> None:
        """key  value lines, empty values left out, nested values as compact JSON."""
        import json

        shown = {k: v for k, v in values.items() if v not in (None, [], {}, "")}
        if not shown:
            return
        width = max(len(k) for k in shown)
        for key, value in shown.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            self.line(f"{indent}{key:<{width}}  {text}")

    def queue_state(self, result: QueueStateResult) -> None:
        if not result.paused:
            self.line("queue running")
        elif result.mode == "after_current":
            self.line("queue paused after the current job")
        else:
            self.line("queue paused")

    def aborted(self, record: JobRecord, *, followed: bool = False) -> None:
        """`followed`: Ctrl-C aborted the job being followed, whose stdout is kept for
        output paths, so the line goes to stderr with its progress."""
        # A queued job is cancelled at once; a running one stops at its next block.
        done = record.state in TERMINAL_STATES
        text = f"job {record.id} {record.state if done else 'aborting'}"
        if followed:
            self.err.print(text, markup=False)
        else:
            self.line(text)

    def cleared(self, result: ClearResult) -> None:
        n = len(result.cancelled)
        ids = ", ".join(map(str, result.cancelled))
        self.line(f"cancelled {n} queued job{'s' if n != 1 else ''}" + (f": {ids}" if n else ""))

    def moved(self, result: MoveResult) -> None:
        self.line(f"job {result.job} is now at position {result.position}")

    def stopping(self, mode: str) -> None:
        self.line(f"wangend is shutting down ({mode})")

    def finished(self, record_or_event: JobRecord | Event) -> None:
        """A followed job has ended: paths on stdout, or why not on stderr."""
        if isinstance(record_or_event, JobRecord):
            r = record_or_event
            job, state, outputs = r.id, r.state, r.outputs
            error = f"{r.error.type}: {r.error.message}" if r.error else ""
        else:
            e = record_or_event
            job, state = e.job, e.type.removeprefix("job.")
            outputs = list(e.data.get("outputs") or [])
            error = _error_text(e.data)
        if state == "succeeded":
            for path in outputs:
                self.line(path)
        else:
            self.err.print(f"job {job} {state}" + (f": {error}" if error else ""), markup=False)

    def notice(self, text: str) -> None:
        self.err.print(text, markup=False, style="dim")

    def error(self, text: str, report: ErrorReport) -> None:
        self.err.print(f"error: {text}", markup=False)

    def events(self, job: int | None) -> EventView:
        from .progress_view import HumanEvents

        return HumanEvents(self.err, job, announced=job in self._announced)

    def _grid(self, rows: list[tuple[str, str]]) -> None:
        # Plain aligned lines, not a rich table: no padding, no wrapping, easy to grep.
        width = max(len(key) for key, _ in rows)
        for key, value in rows:
            self.line(f"{key:<{width}}  {value}")


def _subject(spec: ResolvedJob) -> str:
    """What a listing shows of a job: the prompt, or what a matting job cuts out."""
    if isinstance(spec, ResolvedMatAnyOne):
        return f"matte {Path(spec.input).name} ({spec.mask_type})"
    return spec.prompt


def _spec_rows(spec: ResolvedJob) -> list[tuple[str, str]]:
    if isinstance(spec, ResolvedMatAnyOne):
        frames = f"frames {spec.start_frame}..{spec.end_frame} of {spec.width}x{spec.height}"
        return [
            ("kind", "matanyone"),
            ("weights", spec.model),
            ("input", spec.input),
            ("mask", spec.mask),
            ("matte", f"{spec.mask_type}, {frames} at {spec.fps:g} fps"),
        ]
    rows = [("model", spec.model), ("prompt", spec.prompt)]
    if spec.original_prompt:
        rows.append(("asked", spec.original_prompt))
    if spec.negative_prompt:
        rows.append(("negative", spec.negative_prompt))
    rows += [
        ("video", f"{spec.width}x{spec.height}, {spec.frames} frames at {spec.fps} fps"),
        (
            "sampling",
            f"{spec.steps} steps, guidance {spec.guidance_scale:g}, "
            f"flow shift {spec.flow_shift:g}, seed {spec.seed}",
        ),
    ]
    inputs = [
        f"{name} {value}"
        for name in ("image", "last_image", "video", "mask", "audio")
        if (value := getattr(spec, name))
    ]
    inputs += [f"reference {path}" for path in spec.reference_images]
    if inputs:
        rows.append(("inputs", "; ".join(inputs)))
    if spec.loras:
        rows.append(("loras", " ".join(f"{x.name}:{x.multiplier}" for x in spec.loras)))
    return rows


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
