"""The command line against no daemon and against a scripted one: exit codes, the one
error line, what goes to stdout and stderr, and --json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from wangenctl.cli import app

from .fake_daemon import FakeConnection, FakeDaemon, Reply, running

COMMANDS = [
    "submit",
    "retry",
    "status",
    "list",
    "watch",
    "pause",
    "resume",
    "abort",
    "clear",
    "move",
    "models",
    "shutdown",
]
WANGENCTL = Path(sys.executable).with_name("wangenctl")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment that points the defaults at an empty state dir."""
    for var in ("WANGEN_URL", "WANGEN_TOKEN_FILE", "WANGEN_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANGEN_STATE_DIR", str(tmp_path / "state"))
    return {k: v for k, v in os.environ.items()}


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wc", dir="/tmp") as d:
        yield Path(d) / "wangend.sock"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- help and usage ---------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    for command in COMMANDS:
        assert command in listed
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 ok; 1 the followed job failed" in text
    assert "130 interrupted" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    assert invoke(command, "--help").exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "http://localhost", "status"],
        ["list", "--state", "done"],
        ["move", "3"],
        ["submit"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str], env: dict[str, str]) -> None:
    assert invoke(*args).exit_code == 2


ARGUMENTS = {
    "submit": "[PROMPT]",
    "retry": "JOB",
    "status": "[JOB]",
    "watch": "[JOB]",
    "abort": "[JOB]",
    "move": "JOB POSITION",
    "inspect": "FILE",
    "import-queue": "FILE",
}


@pytest.mark.parametrize(("command", "arguments"), ARGUMENTS.items())
def test_usage_names_arguments_as_the_errors_do(command: str, arguments: str) -> None:
    usage = invoke(command, "--help").stdout.splitlines()[0]
    assert usage == f"Usage: wangenctl {command} [OPTIONS] {arguments}"


def test_a_missing_prompt_is_named_as_the_usage_line_names_it(env: dict[str, str]) -> None:
    result = invoke("submit")
    assert result.exit_code == 2
    assert "Usage: wangenctl submit [OPTIONS] [PROMPT]" in result.stderr
    assert "Invalid value for PROMPT: a prompt is needed" in result.stderr


def test_steps_help_gives_the_cap() -> None:
    text = " ".join(invoke("submit", "--help").stdout.split())
    assert "--steps <int> denoising steps, 1 to 500" in text


def test_list_state_help_says_commas_or_repeats() -> None:
    text = " ".join(invoke("list", "--help").stdout.split())
    assert "-s, --state STATE[,STATE...] only these states, comma-separated or repeated" in text
    assert "<list[str]>" not in text


def test_an_unknown_state_among_commas_is_named(env: dict[str, str]) -> None:
    result = invoke("list", "-s", "queued,done")
    assert result.exit_code == 2
    assert "unknown state 'done'; one of queued, running" in result.stderr


def test_a_negative_position_is_out_of_range_not_an_unknown_option(env: dict[str, str]) -> None:
    result = invoke("move", "4", "-1")
    assert result.exit_code == 2
    assert "POSITION" in result.output and "No such option" not in result.output


# --- no daemon: one line, exit 2, never a traceback ----------------------------------------


def run_wangenctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WANGENCTL), *args], capture_output=True, text=True, env=env, timeout=60
    )


def assert_one_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_socket_is_one_line_and_exit_2(env: dict[str, str], sock_path: Path) -> None:
    result = run_wangenctl(env, "--url", f"unix://{sock_path}", "status")
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_line(
        result.stderr,
        f"error: no wangend daemon at unix://{sock_path}",
        "start one with `wangend serve`",
    )


def test_json_missing_socket_is_one_object_on_stdout(env: dict[str, str], sock_path: Path) -> None:
    result = run_wangenctl(env, "--json", "--url", f"unix://{sock_path}", "status")
    assert result.returncode == 2
    [line] = result.stdout.splitlines()
    message = (
        f"no wangend daemon at unix://{sock_path} (no such socket; start one with `wangend serve`)"
    )
    assert json.loads(line) == {
        "error": {
            "type": "DaemonUnavailable",
            "message": message,
            "code": None,
            "data": None,
            "exit": 2,
        }
    }
    assert_one_line(result.stderr, f"error: {message}")  # and the line for people


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["list", "-s", "queued,done"], "unknown state 'done'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["move", "3"], "Missing argument 'POSITION'"),
    ],
)
def test_json_usage_errors_are_an_object_too(
    args: list[str], said: str, env: dict[str, str]
) -> None:
    result = invoke("--json", *args)
    assert result.exit_code == 2
    [line] = result.stdout.splitlines()
    error = json.loads(line)["error"]
    assert (error["type"], error["exit"], error["code"]) == ("UsageError", 2, None)
    assert said in error["message"]
    assert said in result.stderr  # click's usage text is still there for people


def test_json_inspect_of_a_file_without_settings(env: dict[str, str], tmp_path: Path) -> None:
    plain = tmp_path / "notes.json"
    plain.write_text("{}")
    result = invoke("--json", "inspect", str(plain))
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "NoSettings" and error["exit"] == 1
    assert str(plain) in error["message"]


def test_closed_tcp_port_is_one_line_and_exit_2(env: dict[str, str]) -> None:
    port = closed_port()
    result = run_wangenctl(env, "--url", f"tcp://127.0.0.1:{port}", "submit", "a fox")
    assert result.returncode == 2
    assert_one_line(
        result.stderr,
        f"no wangend daemon at tcp://127.0.0.1:{port}",
        "connection refused",
        "wangend serve",
    )


def test_url_from_the_environment(env: dict[str, str], sock_path: Path) -> None:
    result = run_wangenctl({**env, "WANGEN_URL": f"unix://{sock_path}"}, "list")
    assert result.returncode == 2
    assert_one_line(result.stderr, f"unix://{sock_path}")


def test_default_lookup_names_both_places(env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 7870)) == 0:
            pytest.skip("something listens on the default port here")
    result = invoke("status")
    assert result.exit_code == 2
    sock = tmp_path / "state" / "wangend.sock"
    assert_one_line(result.stderr, f"unix://{sock} or tcp://127.0.0.1:7870")


@pytest.mark.parametrize(
    "args", [["watch"], ["watch", "3"], ["abort"], ["pause"], ["models"], ["retry", "1", "-f"]]
)
def test_every_command_reports_a_missing_daemon_the_same_way(
    args: list[str], env: dict[str, str], sock_path: Path
) -> None:
    result = invoke("--url", str(sock_path), *args)
    assert result.exit_code == 2
    assert_one_line(result.stderr, "no wangend daemon at")


# --- against a scripted daemon ---------------------------------------------------------------


def resolved(prompt: str = "a red fox") -> dict[str, Any]:
    return {
        "kind": "generate",
        "model": "tiny",
        "source": "/models/tiny",
        "prompt": prompt,
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "frames": 9,
        "steps": 2,
        "guidance_scale": 5.0,
        "seed": 42,
        "fps": 8,
        "flow_shift": 3.0,
        "output_name": "{job}",
    }


def record(job: int, state: str, **extra: Any) -> dict[str, Any]:
    return {"id": job, "state": state, "spec": resolved(), "created_at": 1.0, **extra}


STATUS = {
    "version": "0.1.0",
    "pid": 4242,
    "uptime": 65.0,
    "device": "cuda:0",
    "paused": True,
    "pause_mode": "after_current",
    "model": "tiny",
    "queue": {"queued": 2, "running": 1, "succeeded": 5},
    "running": {
        "job": 7,
        "state": "running",
        "model": "tiny",
        "step": 3,
        "steps": 20,
        "phase": "denoising",
        "eta": 12.0,
    },
    "last_seq": 30,
}


def job_story(ending: str, **data: Any) -> Any:
    """An `enqueue` handler: job 5 is queued, then runs to `ending` after the reply."""

    async def enqueue(conn: FakeConnection, params: dict[str, Any]) -> Any:
        async def story() -> None:
            await conn.event(31, "job.queued", 5, position=0)
            await conn.event(32, "job.progress", 6, step=1, steps=2, phase="denoising")
            await conn.event(33, "job.started", 5, attempt=1, model="tiny")
            await conn.event(34, "model.loading", None, model="tiny", device="cpu")
            await conn.event(35, "model.loaded", None, model="tiny", seconds=1.5)
            for step in (1, 2):
                await conn.event(
                    35 + step, "job.progress", 5, step=step, steps=2, phase="denoising", eta=1.0
                )
            await conn.event(38, ending, 5, **data)

        conn.spawn(story)
        return {"job": 5, "state": "queued", "position": 0, "spec": resolved(params["prompt"])}

    return enqueue


async def subscribed(conn: FakeConnection, params: dict[str, Any]) -> Any:
    return {"last_seq": 30, "replayed": 0, "complete": True}


@pytest.fixture
def fake(sock_path: Path, env: dict[str, str]) -> Iterator[tuple[FakeDaemon, str]]:
    async def status(conn: FakeConnection, params: dict[str, Any]) -> Any:
        if "job" not in params:
            return STATUS
        if params["job"] == 9:
            return record(9, "succeeded", outputs=["/out/9.mp4"])
        raise Reply(-32002, f"no job with id {params['job']}", {"job": params["job"]})

    async def enqueue(conn: FakeConnection, params: dict[str, Any]) -> Any:
        if params.get("steps") == 0:
            raise Reply(-32602, "Expected `int` >= 1", {"field": "$.params.steps"})
        return {"job": 5, "state": "queued", "position": 1, "spec": resolved(params["prompt"])}

    async def jobs(conn: FakeConnection, params: dict[str, Any]) -> Any:
        return {
            "jobs": [
                record(3, "queued"),
                record(2, "failed", error={"type": "OOM", "message": "boom"}),
            ]
        }

    async def abort(conn: FakeConnection, params: dict[str, Any]) -> Any:
        raise Reply(-32003, "nothing is running")

    daemon = FakeDaemon(
        {
            "status": status,
            "enqueue": enqueue,
            "jobs": jobs,
            "abort": abort,
            "subscribe": subscribed,
        }
    )
    with running(daemon, unix=sock_path) as url:
        yield daemon, url


def test_status_summary(fake: tuple[FakeDaemon, str]) -> None:
    _, url = fake
    result = invoke("--url", url, "status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "wangend 0.1.0, pid 4242, up 1m05s" in out
    assert "cuda:0" in out
    assert "tiny (warm)" in out
    assert "paused (after the current job)" in out
    assert "2 queued, 1 running" in out
    assert "job 7 (tiny) running, denoising 3/20, eta 12s" in out


def test_json_status_is_one_object(fake: tuple[FakeDaemon, str]) -> None:
    _, url = fake
    result = invoke("--url", url, "--json", "status")
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["running"]["job"] == 7


def test_submit_prints_the_id_and_sends_only_given_fields(fake: tuple[FakeDaemon, str]) -> None:
    daemon, url = fake
    result = invoke("--url", url, "submit", "a red fox", "--steps", "4", "--guidance", "3.5")
    assert result.exit_code == 0
    assert result.stdout == "5\n"
    assert daemon.calls[-1][1:] == (
        "enqueue",
        {"prompt": "a red fox", "steps": 4, "guidance_scale": 3.5},
    )


def test_invalid_params_name_the_field_in_words(fake: tuple[FakeDaemon, str]) -> None:
    _, url = fake
    result = invoke("--url", url, "submit", "x", "--steps", "0")
    assert result.exit_code == 1
    assert result.stderr == "error: steps: must be at least 1\n"
    assert result.stdout == ""


def test_json_error_keeps_the_daemons_own_words(fake: tuple[FakeDaemon, str]) -> None:
    _, url = fake
    result = invoke("--url", url, "--json", "submit", "x", "--steps", "0")
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert json.loads(line) == {
        "error": {
            "type": "RpcError",
            "message": "Expected `int` >= 1",
            "code": -32602,
            "data": {"field": "$.params.steps"},
            "exit": 1,
        }
    }
    assert result.stderr == "error: steps: must be at least 1\n"  # people still read it


def test_rpc_errors_exit_1(fake: tuple[FakeDaemon, str]) -> None:
    _, url = fake
    assert invoke("--url", url, "abort").stderr == "error: nothing is running\n"
    result = invoke("--url", url, "status", "404")
    assert (result.exit_code, result.stderr) == (1, "error: no job with id 404\n")


@pytest.mark.parametrize(
    ("args", "sent"),
    [
        (["-s", "queued,failed"], ["queued", "failed"]),
        (["-s", "queued, failed", "--state", "running,queued"], ["queued", "failed", "running"]),
        (["-s", "aborted"], ["aborted"]),
    ],
)
def test_list_takes_states_comma_separated_and_repeated(
    fake: tuple[FakeDaemon, str], args: list[str], sent: list[str]
) -> None:
    daemon, url = fake
    result = invoke("--url", url, "list", *args)
    assert result.exit_code == 0, result.output
    assert daemon.calls[-1][1:] == ("jobs", {"limit": 100, "state": sent})


def test_list_table_and_json_lines(fake: tuple[FakeDaemon, str]) -> None:
    daemon, url = fake
    table = invoke("--url", url, "list", "--state", "queued", "-s", "failed", "--limit", "5")
    assert table.exit_code == 0
    assert "STATE" in table.stdout and "boom" in table.stdout
    assert daemon.calls[-1][2] == {"limit": 5, "state": ["queued", "failed"]}
    lines = invoke("--url", url, "--json", "list").stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [3, 2]


def test_watch_a_finished_job_prints_its_outputs(fake: tuple[FakeDaemon, str]) -> None:
    _, url = fake
    result = invoke("--url", url, "watch", "9")
    assert (result.exit_code, result.stdout) == (0, "/out/9.mp4\n")


@pytest.fixture
def story_daemon(sock_path: Path, env: dict[str, str], request: pytest.FixtureRequest) -> Any:
    ending, data = request.param

    async def status(conn: FakeConnection, params: dict[str, Any]) -> Any:
        return STATUS

    daemon = FakeDaemon(
        {"subscribe": subscribed, "enqueue": job_story(ending, **data), "status": status}
    )
    with running(daemon, unix=sock_path) as url:
        yield daemon, url


@pytest.mark.parametrize(
    "story_daemon", [("job.succeeded", {"outputs": ["/out/5.mp4"]})], indirect=True
)
def test_follow_subscribes_first_and_ends_with_the_path(story_daemon: Any) -> None:
    daemon, url = story_daemon
    result = invoke("--url", url, "submit", "a fox", "--follow")
    assert result.exit_code == 0, result.output
    # stdout is only the path (`OUT=$(wangenctl submit -f ...)`); the id is on stderr, once.
    assert result.stdout == "/out/5.mp4\n"
    assert result.stderr.splitlines()[0] == "job 5 queued at position 0"
    assert result.stderr.count("job 5 queued") == 1
    assert [m for _, m, _ in daemon.calls][:2] == ["subscribe", "enqueue"]
    # Progress is on stderr: the model load it waited for, and not job 6's steps.
    assert "loading model tiny" in result.stderr
    assert "job 6" not in result.stderr


@pytest.mark.parametrize(
    "story_daemon",
    [("job.failed", {"error": {"type": "OutOfMemory", "message": "CUDA out of memory"}})],
    indirect=True,
)
def test_follow_of_a_failing_job_exits_1(story_daemon: Any) -> None:
    _, url = story_daemon
    result = invoke("--url", url, "submit", "a fox", "-f")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "job 5 queued at position 0" in result.stderr
    assert result.stderr.splitlines()[-1] == "job 5 failed: OutOfMemory: CUDA out of memory"


@pytest.mark.parametrize(
    "story_daemon", [("job.succeeded", {"outputs": ["/out/5.mp4"]})], indirect=True
)
def test_json_follow_is_ndjson_of_the_jobs_events(story_daemon: Any) -> None:
    _, url = story_daemon
    result = invoke("--url", url, "--json", "submit", "a fox", "--follow")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["job"] == 5 and lines[0]["state"] == "queued"
    events = lines[1:]
    assert [e["seq"] for e in events] == [31, 33, 34, 35, 36, 37, 38]
    assert events[-1]["data"]["outputs"] == ["/out/5.mp4"]
