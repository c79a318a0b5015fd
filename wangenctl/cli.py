"""wangenctl: drive a running wangend daemon from the shell.

Each command says what to ask the daemon and hands the answer to a renderer; none
touches a socket (the client does) or formats output (render.py does). `_run` is the one
boundary where the client's errors become a line on stderr (with --json, also an
`{"error": ...}` object on stdout) and an exit code:

    0    ok
    1    the followed job failed or was aborted, or the daemon answered with an error
    2    no daemon reachable, its token refused, or a usage error
    130  interrupted (Ctrl-C)
    141  stdout was closed early (`wangenctl list | head -1`): nothing more is printed

A closed stdout ends a command quietly wherever it is noticed (`_Commands.invoke`), with
the status a shell tool killed by SIGPIPE reports, so a pipeline reads as it would with
`ls` or `cat` and no traceback lands on the terminal.

The daemon is found at --url / $WANGEN_URL, else the default Unix socket when it exists,
else tcp://127.0.0.1:7870 (with the token from --token-file / $WANGEN_TOKEN_FILE / the
state dir). This module imports only typer and wangend.protocol at load time, so
`wangenctl --help` and shell completion stay quick; anyio and rich load on use.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
import typer.core

from wangend.protocol import JOB_STATES, TERMINAL_STATES, Event

from .render import TERMINAL_EVENTS, JsonRenderer, Renderer, error_report, make_renderer

if TYPE_CHECKING:
    from pathlib import Path

    from .client import Client, RpcError

__all__ = ["app", "main"]

EXIT_CODES = (
    "Exit codes: 0 ok; 1 the followed job failed or was aborted, or the daemon answered "
    "with an error; 2 no daemon reachable, token refused, or usage error; 130 interrupted; "
    "141 stdout closed early (a pipe into `head`)."
)
# 128 + SIGPIPE (13): what a shell reports for a tool killed by writing to a closed pipe.
EXIT_BROKEN_PIPE = 141


class _Commands(typer.core.TyperGroup):
    """The command group; with --json, a usage error is also an `{"error": ...}` line.

    click still prints the usage and the error on stderr and exits 2; this only adds the
    object on stdout, so a program reading stdout is told about every failure, not only
    those that reach `_run`. An error in the global options before --json is read (a
    mistyped option) stays text: there is no telling yet what the caller wanted.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException as exc:  # click's usage errors (typer's own copy)
            if ctx.params.get("json"):
                report = error_report(exc, exc.exit_code)
                JsonRenderer().emit({"error": report})
            raise
        except BaseException as exc:
            # Caught here, not left to click: click would exit 1 for a bare one, and one
            # raised inside the client's task group arrives wrapped in an exception group.
            if _is_broken_pipe(exc):
                _stdout_gone()
            raise


def _is_broken_pipe(exc: BaseException) -> bool:
    """True for a BrokenPipeError, or an exception group (at any depth) holding nothing
    else: the reader of our output went away, and that is all that went wrong. A group
    that also holds another failure is left alone, so that failure is still reported."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_broken_pipe(inner) for inner in exc.exceptions)
    return isinstance(exc, BrokenPipeError)


def _stdout_gone() -> NoReturn:
    """End quietly because stdout was closed: no traceback, nothing on stderr, 141.

    Python's recipe for SIGPIPE (the `signal` module's notes): point stdout at /dev/null
    first, so what is still buffered for it is flushed there when the interpreter exits
    instead of raising BrokenPipeError a second time.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (captured in tests)
        pass
    raise typer.Exit(EXIT_BROKEN_PIPE) from None


class _Command(typer.core.TyperCommand):
    """A command whose usage line is in the usual notation, `move [OPTIONS] JOB POSITION`
    (as the README and the error messages name them), not typer's `{JOB} {POSITION}`."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


class _App(typer.Typer):
    """typer.Typer whose commands are `_Command`s (jobs_cli.py registers on it too)."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    name="wangenctl",
    cls=_Commands,
    help="Drive the wangend video generation daemon: submit jobs, follow them, manage the queue.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass(frozen=True, slots=True)
class Options:
    url: str | None
    token_file: str | None
    json: bool
    timeout: float | None = None


@app.callback()
def _options(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="WANGEN_URL",
            help="tcp://host:port or unix:///path (default: the state dir's socket if it "
            "exists, else tcp://127.0.0.1:7870)",
        ),
    ] = None,
    token_file: Annotated[
        str | None,
        typer.Option(
            "--token-file",
            envvar="WANGEN_TOKEN_FILE",
            help="token for TCP (default: <state dir>/token)",
        ),
    ] = None,
    json: Annotated[
        bool, typer.Option("--json", help="print NDJSON: one JSON object per line")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            envvar="WANGEN_TIMEOUT",
            min=0,
            help="seconds to wait for each reply before giving up (exit 2); 0 waits for "
            "ever. Following a job's progress is not limited by it",
        ),
    ] = 60.0,
) -> None:
    if url:
        from .endpoint import parse_url

        try:
            parse_url(url)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--url") from None
    ctx.obj = Options(
        url=url or None, token_file=token_file or None, json=json, timeout=timeout or None
    )


Work = Callable[["Client", Renderer], Awaitable[int | None]]


def _run(ctx: typer.Context, work: Work) -> None:
    """Connect, run `work`, and translate every failure into a line and an exit code.

    This is the CLI's only error boundary: no traceback reaches the user for anything
    the client can name.
    """
    import anyio

    from .client import AuthError, DaemonUnavailable, WangenctlError, connect

    opts: Options = ctx.obj
    out = make_renderer(opts.json)

    async def session() -> int | None:
        async with connect(opts.url, opts.token_file, call_timeout=opts.timeout) as client:
            return await work(client, out)

    try:
        code = anyio.run(session)
    except (DaemonUnavailable, AuthError) as exc:
        _fail(out, exc, 2)
    except WangenctlError as exc:  # RpcError, ProtocolError
        _fail(out, exc, 1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code or 0)


def _fail(out: Renderer, error: Exception, exit: int) -> NoReturn:
    """Say why the command failed (a line; with --json also the object) and exit."""
    out.error(str(error), error_report(error, exit))
    raise typer.Exit(exit) from None


# --- following a job ---------------------------------------------------------------------


class _JobStory:
    """Which events belong to one job's story: its own, queue-wide changes, and the model
    loads the worker does while it is that job's turn."""

    def __init__(self, job: int) -> None:
        self.job = job
        self.on_worker = False

    def wants(self, event: Event) -> bool:
        if event.job == self.job:
            if event.type == "job.started":
                self.on_worker = True
            elif event.type in TERMINAL_EVENTS:
                self.on_worker = False
            return True
        if event.job is not None:
            return False
        return event.type.startswith(("queue.", "daemon.")) or (
            self.on_worker and event.type.startswith("model.")
        )


async def _until_interrupted(fn: Callable[[], Awaitable[None]]) -> bool:
    """Run `fn`; return True when Ctrl-C stopped it instead of it ending by itself.

    SIGINT is taken as a message rather than a KeyboardInterrupt, so the caller can still
    talk to the daemon afterwards (to abort the job it was following).
    """
    import anyio

    interrupted = False
    error: Exception | None = None
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(on_signal)
            try:
                await fn()
            except Exception as exc:  # raised below, outside the task group
                error = exc
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return interrupted


async def _follow(
    client: Client,
    out: Renderer,
    opts: Options,
    job: int,
    since: int | None,
    *,
    abort_on_interrupt: bool,
    seed: Any = None,
    on_event: Callable[[Event], None] | None = None,
) -> int:
    """Show one job's events until it ends; 0 if it succeeded, 1 if not, 130 on Ctrl-C.

    `client` must already be subscribed with `since`, so events published between that
    and now (the job's own `job.queued`) are not lost.
    """
    from .client import RpcError, connect
    from .follower import EventFollower

    story = _JobStory(job)
    ending: list[Event] = []
    with out.events(job) as view:
        if seed is not None:
            view.seed(seed)
            story.on_worker = seed.state in ("running", "paused")
        follower = EventFollower(opts.url, opts.token_file, since=since, on_notice=view.notice)

        def handle(event: Event) -> bool:
            if not story.wants(event):
                return False
            if on_event is not None:
                on_event(event)
            view.event(event)
            if event.job == job and event.type in TERMINAL_EVENTS:
                ending.append(event)
                return True
            return False

        interrupted = await _until_interrupted(lambda: follower.run(handle, client))
    if interrupted:
        if not abort_on_interrupt:
            out.notice(f"stopped following job {job}; it keeps running")
            return 130
        try:
            if client.closed:  # the follower moved to a new connection
                async with connect(opts.url, opts.token_file, call_timeout=opts.timeout) as again:
                    out.aborted(await again.abort(job), followed=True)
            else:
                out.aborted(await client.abort(job), followed=True)
        except RpcError as exc:
            out.error(f"could not abort job {job}: {exc}", error_report(exc, 130))
        return 130
    out.finished(ending[0])
    return 0 if ending[0].type == "job.succeeded" else 1


async def _say_if_held(client: Client, out: Renderer, job: int, state: str) -> None:
    """Before following a job that is waiting: say so when only `resume` can start it.

    A paused queue (the pause survives restarts) starts nothing, so following a queued
    job there would wait in silence for as long as nobody resumes; a held running job
    (`paused`) waits the same way. Said once, on stderr, before the progress view opens.
    """
    if state not in ("queued", "paused"):
        return
    if (await client.status()).paused:
        out.notice(f"the queue is paused: job {job} waits until `wangenctl resume`")


async def _enqueue_and_follow(
    client: Client,
    out: Renderer,
    opts: Options,
    enqueue: Callable[[], Awaitable[Any]],
    follow: bool,
    detach: bool,
    on_event: Callable[[Event], None] | None = None,
) -> int:
    """Enqueue (submit or retry) and, with --follow, subscribe first so nothing is missed."""
    if not follow:
        out.enqueued(await enqueue())
        return 0
    subscribed = await client.subscribe()
    result = await enqueue()
    out.following(result)
    await _say_if_held(client, out, result.job, result.state)
    return await _follow(
        client,
        out,
        opts,
        result.job,
        subscribed.last_seq,
        abort_on_interrupt=not detach,
        on_event=on_event,
    )


# --- commands --------------------------------------------------------------------------------

FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="show progress until the job ends")]
DetachOpt = Annotated[
    bool,
    typer.Option("--detach", help="with --follow: Ctrl-C stops following, the job keeps running"),
]


# `submit`, `matanyone`, `inspect`, `loras` and `presets` live in jobs_cli.py; importing it
# here registers them on `app` in this place of the help's command list.
from . import jobs_cli  # noqa: E402, F401


@app.command()
def retry(
    ctx: typer.Context,
    job: Annotated[int, typer.Argument(metavar="JOB", help="a failed or aborted job")],
    enhance: Annotated[
        bool,
        typer.Option("--enhance", help="enhance the original prompt again, not reuse the result"),
    ] = False,
    follow: FollowOpt = False,
    detach: DetachOpt = False,
) -> None:
    """Queue a new job with the same settings (and seed); print its id."""
    opts: Options = ctx.obj
    _run(
        ctx,
        lambda c, out: _enqueue_and_follow(
            c, out, opts, lambda: c.retry(job, enhance), follow, detach
        ),
    )


@app.command()
def status(
    ctx: typer.Context,
    job: Annotated[int | None, typer.Argument(metavar="JOB", help="show this job's record")] = None,
) -> None:
    """The daemon's summary (version, device, warm model, queue, running job), or a job."""

    async def work(c: Client, out: Renderer) -> None:
        if job is None:
            out.status(await c.status())
        else:
            out.job(await c.job(job))

    _run(ctx, work)


def _parse_states(values: list[str] | None) -> list[str]:
    """`-s queued,failed` and `-s queued -s failed` alike: the states, each once, in the
    order given; an unknown one is a usage error naming the choices."""
    states: list[str] = []
    for value in values or []:
        for name in filter(None, (part.strip() for part in value.split(","))):
            if name not in JOB_STATES:
                raise typer.BadParameter(
                    f"unknown state {name!r}; one of {', '.join(JOB_STATES)}",
                    param_hint="--state",
                )
            if name not in states:
                states.append(name)
    return states


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            "-s",
            metavar="STATE[,STATE...]",
            help=f"only these states, comma-separated or repeated ({', '.join(JOB_STATES)})",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many")] = 100,
) -> None:
    """Jobs: queued ones in run order, then the rest newest first."""
    states = _parse_states(state)

    async def work(c: Client, out: Renderer) -> None:
        out.jobs((await c.jobs(states or None, limit)).jobs)

    _run(ctx, work)


@app.command()
def watch(
    ctx: typer.Context,
    job: Annotated[int | None, typer.Argument(metavar="JOB", help="follow only this job")] = None,
) -> None:
    """Stream events with progress bars; reconnects and resumes if the link drops.

    With JOB: ends when the job does (exit 0 if it succeeded, 1 if not).
    """
    opts: Options = ctx.obj

    async def work(c: Client, out: Renderer) -> int:
        from .follower import EventFollower

        subscribed = await c.subscribe()
        if job is not None:
            record = await c.job(job)
            if record.state in TERMINAL_STATES:
                out.finished(record)
                return 0 if record.state == "succeeded" else 1
            await _say_if_held(c, out, job, record.state)
            return await _follow(
                c, out, opts, job, subscribed.last_seq, abort_on_interrupt=False, seed=record
            )
        with out.events(None) as view:
            status = await c.status()
            if status.running is not None:
                view.seed(await c.job(status.running.job))
            follower = EventFollower(
                opts.url, opts.token_file, since=subscribed.last_seq, on_notice=view.notice
            )

            def show(event: Event) -> bool:
                view.event(event)
                return False

            await _until_interrupted(lambda: follower.run(show, c))
        return 130

    _run(ctx, work)


@app.command()
def pause(
    ctx: typer.Context,
    after_current: Annotated[
        bool,
        typer.Option("--after-current", help="let the running job finish, start nothing new"),
    ] = False,
) -> None:
    """Hold the running job at its next step and start nothing new."""
    mode = "after_current" if after_current else "now"

    async def work(c: Client, out: Renderer) -> None:
        out.queue_state(await c.pause(mode))

    _run(ctx, work)


@app.command()
def resume(ctx: typer.Context) -> None:
    """Continue the held job from the same step, and the queue after it."""

    async def work(c: Client, out: Renderer) -> None:
        out.queue_state(await c.resume())

    _run(ctx, work)


@app.command()
def abort(
    ctx: typer.Context,
    job: Annotated[
        int | None, typer.Argument(metavar="JOB", help="default: the running job")
    ] = None,
) -> None:
    """Abort the running job (or cancel a queued one); the queue goes on."""

    async def work(c: Client, out: Renderer) -> None:
        out.aborted(await c.abort(job))

    _run(ctx, work)


@app.command()
def clear(ctx: typer.Context) -> None:
    """Cancel every queued job (the running one is left alone)."""

    async def work(c: Client, out: Renderer) -> None:
        out.cleared(await c.clear())

    _run(ctx, work)


# "-1" is a number here, not an option, so a negative position gets the range error.
@app.command(context_settings={"ignore_unknown_options": True})
def move(
    ctx: typer.Context,
    job: Annotated[int, typer.Argument(metavar="JOB", help="a queued job")],
    position: Annotated[int, typer.Argument(min=0, metavar="POSITION", help="0 = next to run")],
) -> None:
    """Move a queued job to another place in the queue."""

    async def work(c: Client, out: Renderer) -> None:
        out.moved(await c.move(job, position))

    _run(ctx, work)


@app.command()
def models(ctx: typer.Context) -> None:
    """The models the daemon knows, whether they are on disk and which one is warm."""

    async def work(c: Client, out: Renderer) -> None:
        out.models((await c.models()).models)

    _run(ctx, work)


@app.command()
def shutdown(
    ctx: typer.Context,
    finish: Annotated[
        bool,
        typer.Option("--finish", help="let the running job end first (default: requeue it)"),
    ] = False,
) -> None:
    """Stop the daemon; a running job ends its step and is requeued: the next start goes on
    from there."""
    mode = "finish" if finish else "graceful"

    async def work(c: Client, out: Renderer) -> None:
        await c.shutdown(mode)
        out.stopping(mode)

    _run(ctx, work)


@app.command("import-queue")
def import_queue(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Argument(metavar="FILE", help="Wan2GP queue.zip, queue.json or settings .json"),
    ],
    model_map: Annotated[
        list[str] | None,
        typer.Option(
            "--model-map",
            metavar="TYPE=MODEL",
            help="WAN2GP_TYPE=MODEL, e.g. t2v=wan2.1-t2v-14b (repeat)",
        ),
    ] = None,
    media_dir: Annotated[
        str | None,
        typer.Option(help="where attached media go (default ~/.local/share/wangend/imports/NAME)"),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="print the mapping and what the daemon would refuse; queue nothing, keep no files",
        ),
    ] = False,
) -> None:
    """Queue the tasks of a saved Wan2GP queue; report per task what was queued or why not.

    Exit 1 when the daemon refused any task (the others are still queued), or with
    --dry-run would refuse one.
    """
    from contextlib import ExitStack
    from pathlib import Path

    import msgspec

    from . import importer

    opts: Options = ctx.obj
    path = Path(file).expanduser()
    try:
        mapping = importer.parse_model_map(model_map or [])
        queue = importer.read_queue(path)
    except importer.QueueImportError as exc:
        _fail(make_renderer(opts.json), exc, 2)
    folder = Path(media_dir).expanduser() if media_dir else importer.default_media_dir(path)
    tasks, attachments = importer.map_tasks(queue, mapping, folder)

    def report() -> None:
        for task in tasks:
            if opts.json:
                typer.echo(msgspec.json.encode(task).decode())
            else:
                typer.echo(importer.describe(task))

    with ExitStack() as staged:
        # What is sent: the tasks themselves, or for a dry run with attachments, copies
        # whose files are in a scratch folder that is gone when the command ends.
        sent, scratch = tasks, None
        try:
            if dry_run and attachments:
                scratch = staged.enter_context(importer.staging_dir(folder))
                sent, attachments = importer.map_tasks(queue, mapping, scratch)
            importer.extract_media(queue, attachments)
        except OSError as exc:
            problem = importer.QueueImportError(f"cannot extract media to {folder}: {exc}")
            _fail(make_renderer(opts.json), problem, 2)

        async def work(c: Client, out: Renderer) -> int:
            from wangend.protocol import JobError

            from .client import RpcError

            refusals: list[RpcError] = []
            for task, copy in zip(tasks, sent, strict=True):
                if copy.spec is None:
                    continue
                try:
                    if dry_run:
                        await c.validate(copy.spec)
                    else:
                        task.job = (await c.enqueue(copy.spec)).job
                except RpcError as exc:
                    refusal = exc if scratch is None else _unstaged(exc, scratch, folder)
                    task.error = JobError(type="RpcError", message=str(refusal))
                    refusals.append(refusal)
            report()
            if not refusals:
                return 0
            mapped = sum(1 for t in tasks if t.spec is not None)
            text = f"the daemon {'would refuse' if dry_run else 'refused'} "
            text += f"{len(refusals)} of {mapped} tasks"
            if not dry_run and len(refusals) < mapped:
                text += "; the others are queued"
            out.error(text, error_report(refusals[0], 1))
            return 1

        _run(ctx, work)


def _unstaged(exc: RpcError, scratch: Path, folder: Path) -> RpcError:
    """A dry run's refusal as the real import would word it: the scratch folder's paths
    (in the message and the data alike) named where the import puts the files."""
    import msgspec

    from .client import RpcError

    # Replaced in the JSON text, so a path is matched however `data` nests or quotes it.
    old, new = (msgspec.json.encode(str(p.absolute()))[1:-1] for p in (scratch, folder))
    text = msgspec.json.encode([exc.message, exc.data]).replace(old, new)
    message, data = msgspec.json.decode(text)
    return RpcError(exc.code, message, data)


def main() -> None:
    """The `wangenctl` console script."""
    app()


if __name__ == "__main__":
    # Run as `python -m wangenctl.cli`: this copy of the module is `__main__`, but the
    # command modules register on `wangenctl.cli.app`, so run that one.
    from wangenctl.cli import main as package_main

    package_main()
