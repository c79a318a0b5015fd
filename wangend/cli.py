"""`wangend serve | token | config check | config show | install-units | history`.

The entry point is the only place that installs signal handlers and calls `sys.exit`;
everything below it raises. Exit codes: 0 clean stop, 1 runtime failure, 2 bad config or
usage, 3 another daemon already owns the state dir.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from . import __version__
from .config import (
    ConfigError,
    ConfigValue,
    ServerConfig,
    effective_values,
    load_config,
    load_config_sources,
)
from .logs import setup_logging

# Plain help and errors, as wangenctl's: typer's rich mode would box a usage error,
# keep the docstrings' hard line breaks, and show every flag as taking a `<bool>`.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="wangend: the Wan video generation daemon.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(
    no_args_is_help=True, help="Check or show the effective config.", rich_markup_mode=None
)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML config file", envvar="WANGEN_CONFIG")
]
HostOpt = Annotated[str | None, typer.Option(help="TCP address to bind")]
PortOpt = Annotated[int | None, typer.Option(help="TCP port (0 = any free port)")]
NoTcpOpt = Annotated[bool, typer.Option("--no-tcp", help="Unix socket only")]
SocketOpt = Annotated[str | None, typer.Option("--socket", help="Unix socket path")]
StateOpt = Annotated[str | None, typer.Option(help="Queue, token and model cache")]
OutputOpt = Annotated[str | None, typer.Option(help="Where outputs are written")]
ModelOpt = Annotated[str | None, typer.Option(help="Default model for jobs naming none")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")]
LogOpt = Annotated[str | None, typer.Option(help="debug, info, warning, error")]
GraceOpt = Annotated[
    float | None,
    typer.Option(help="Seconds a running job may take to finish on stop before it is requeued"),
]


def _overrides(
    host: str | None = None,
    port: int | None = None,
    no_tcp: bool = False,
    socket: str | None = None,
    state_dir: str | None = None,
    output_dir: str | None = None,
    model: str | None = None,
    device: str | None = None,
    log_level: str | None = None,
    stop_grace: float | None = None,
) -> dict[str, object]:
    """Flags as config keys; None means "not given", so the file or env value stands."""
    return {
        "host": host,
        "port": port,
        "tcp": False if no_tcp else None,
        "socket": socket,
        "state_dir": state_dir,
        "output_dir": output_dir,
        "model": model,
        "device": device,
        "log_level": log_level,
        "stop_grace": stop_grace,
    }


def _load(config: Path | None, overrides: dict[str, object] | None = None) -> ServerConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"wangend: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    no_tcp: NoTcpOpt = False,
    socket: SocketOpt = None,
    state_dir: StateOpt = None,
    output_dir: OutputOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    log_level: LogOpt = None,
    stop_grace: GraceOpt = None,
) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT or the `shutdown` call."""
    overrides = _overrides(
        host, port, no_tcp, socket, state_dir, output_dir, model, device, log_level, stop_grace
    )
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:  # a log line like every other startup error (journald <3>)
        setup_logging("info")
        logging.getLogger("wangend").error("%s", exc)
        raise typer.Exit(2) from None
    setup_logging(cfg.log_level)
    from .server.daemon import StartupError, run_daemon  # heavy imports only for serve
    from .server.systemd import listen_sockets

    def reload() -> ServerConfig:  # SIGHUP: the same file, env and flags, read again
        return load_config(config, overrides)

    try:
        code = run_daemon(cfg, reload=reload, sockets=listen_sockets())
    except StartupError as exc:
        logging.getLogger("wangend").error("%s", exc)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


@app.command()
def token(config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Print the path of the token file that TCP clients authenticate with."""
    typer.echo(_load(config, {"state_dir": state_dir}).token_path)


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the config (file, env, defaults); exit 2 naming the bad key."""
    cfg = _load(config)
    from .pipelines.registry import ModelRegistry

    try:
        registry = ModelRegistry(cfg.models_path, cfg.models)
    except ConfigError as exc:
        typer.echo(f"wangend: {exc}", err=True)
        raise typer.Exit(2) from None
    unusable = registry.unusable([cfg.model, *cfg.models])
    for name, why in unusable.items():
        where = f"models.{name}" if name in cfg.models else f"model {name} (the default)"
        typer.echo(f"wangend: warning: {where}: {why}", err=True)
    note = f"; {len(unusable)} of the models named cannot be used now" if unusable else ""
    typer.echo(f"config ok (state dir {cfg.state_dir}){note}")


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
    host: HostOpt = None,
    port: PortOpt = None,
    no_tcp: NoTcpOpt = False,
    socket: SocketOpt = None,
    state_dir: StateOpt = None,
    output_dir: OutputOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    log_level: LogOpt = None,
    stop_grace: GraceOpt = None,
) -> None:
    """Print every effective setting and where it came from: default, the file, an
    environment variable or a flag (the same flags as `serve`)."""
    overrides = _overrides(
        host, port, no_tcp, socket, state_dir, output_dir, model, device, log_level, stop_grace
    )
    try:
        cfg, sources = load_config_sources(config, overrides)
    except ConfigError as exc:
        typer.echo(f"wangend: {exc}", err=True)
        raise typer.Exit(2) from None
    entries = effective_values(cfg, sources)
    if as_json:
        document = {
            "config": msgspec.to_builtins(cfg),
            "sources": {e.key: e.source for e in entries},
        }
        typer.echo(msgspec.json.encode(document).decode())
        return
    for line in render_toml(entries):
        typer.echo(line)


def render_toml(entries: list[ConfigValue]) -> list[str]:
    """TOML a config file could hold, each line commented with its source."""
    lines: list[str] = []
    table = ""
    for entry in entries:
        section, _, key = entry.key.rpartition(".")
        if section.startswith("models."):  # [models.NAME]; a name may hold dots
            name = section.removeprefix("models.")
            section = (
                f"models.{name}" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else (f'models."{name}"')
            )
        if section != table:
            lines.append(f"\n[{section}]")
            table = section
        if entry.value is None:  # TOML has no null: leave the key out, commented
            text = f"# {key} (not set)"
        elif isinstance(entry.value, bool):
            text = f"{key} = {'true' if entry.value else 'false'}"
        else:
            text = f"{key} = {msgspec.json.encode(entry.value).decode()}"
        lines.append(f"{text:<44} # {entry.source}")
    return lines


@app.command("install-units")
def install_units(
    user: Annotated[bool, typer.Option("--user", help="A per-user service")] = False,
    dest: Annotated[
        Path | None,
        typer.Option(help="Directory (default /etc/systemd/system, ~/.config/systemd/user)"),
    ] = None,
    exec_path: Annotated[
        str | None, typer.Option("--exec", help="The wangend executable for ExecStart")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the units only")] = False,
) -> None:
    """Write the systemd units with ExecStart pointing at this wangend."""
    from .server.systemd import find_wangend, render_units

    try:
        wangend = str(Path(exec_path).absolute()) if exec_path else find_wangend()
    except FileNotFoundError as exc:
        typer.echo(f"wangend: {exc}", err=True)
        raise typer.Exit(2) from None
    if dest is None:
        home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        dest = home / "systemd" / "user" if user else Path("/etc/systemd/system")
    units = render_units(wangend, user=user)
    for name, text in units.items():
        target = dest / name
        if dry_run:
            typer.echo(f"# would write {target}\n{text}")
            continue
        try:
            dest.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        except OSError as exc:
            typer.echo(f"wangend: cannot write {target}: {exc.strerror}", err=True)
            raise typer.Exit(1) from None
        note = f" (ExecStart={wangend} serve)" if name.endswith(".service") else ""
        typer.echo(f"wrote {target}{note}")
    if not dry_run:
        ctl = "systemctl --user" if user else "systemctl"
        enable = "wangend" if user else "wangend.socket wangend.service"
        typer.echo(f"next: {ctl} daemon-reload && {ctl} enable --now {enable}")


def parse_since(text: str) -> float:
    """`--since`: Unix seconds ("1764000000") or ISO 8601 ("2026-11-24",
    "2026-11-24T15:00", "2026-11-24T15:00:00+01:00"); a time without a zone is local."""
    from datetime import datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither Unix seconds nor an ISO 8601 date or time",
            param_hint="--since",
        ) from None


@app.command()
def history(
    config: ConfigOpt = None,
    state_dir: StateOpt = None,
    since: Annotated[
        str | None,
        typer.Option(
            metavar="TIMESTAMP",
            help="only jobs finished at or after this: Unix seconds or ISO 8601 (local time)",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here instead of stdout")
    ] = None,
) -> None:
    """Export the run history as JSONL: one line per finished job with its outputs.

    Reads the queue database directly (read-only), so it works while the daemon runs and
    when it does not. With --output the file appears whole or not at all (written under a
    temporary name, then renamed).
    """
    import sqlite3

    from .queue.history import export_history

    since_ts = parse_since(since) if since is not None else None
    cfg = _load(config, _overrides(state_dir=state_dir))
    partial = None if output is None else output.with_name(f".{output.name}.partial")
    try:
        if output is None or partial is None:
            count = export_history(cfg.db_path, sys.stdout, since_ts)
        else:
            with open(partial, "w", encoding="utf-8") as out:
                count = export_history(cfg.db_path, out, since_ts)
            os.replace(partial, output)
    except sqlite3.DatabaseError as exc:
        typer.echo(f"wangend: cannot read {cfg.db_path}: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is None:  # the database
            typer.echo(f"wangend: no queue database at {cfg.db_path}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wangend: cannot write {output}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    typer.echo(f"{count} jobs exported", err=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
