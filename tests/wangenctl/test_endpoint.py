"""Where the client looks for the daemon: URLs, the environment, the default socket, and
the token file TCP needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from wangenctl.endpoint import Endpoint, parse_url, resolve_endpoint, resolve_token_file
from wangend.protocol import DEFAULT_PORT


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://10.0.0.5:9000", Endpoint("tcp", host="10.0.0.5", port=9000)),
        ("tcp://localhost", Endpoint("tcp", host="localhost", port=DEFAULT_PORT)),
        ("TCP://[::1]:7871", Endpoint("tcp", host="::1", port=7871)),
        ("unix:///run/wangend.sock", Endpoint("unix", path="/run/wangend.sock")),
        ("/run/wangend.sock", Endpoint("unix", path="/run/wangend.sock")),
    ],
)
def test_parse_url(url: str, expected: Endpoint) -> None:
    assert parse_url(url) == expected


def test_urls_print_back_as_urls() -> None:
    assert parse_url("tcp://[::1]:7871").url == "tcp://[::1]:7871"
    assert str(parse_url("/a/b.sock")) == "unix:///a/b.sock"


def test_bare_path_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/ada")
    assert parse_url("~/w.sock") == Endpoint("unix", path="/home/ada/w.sock")


@pytest.mark.parametrize(
    "url", ["", "http://host:80", "tcp://host:port", "tcp://host:1/path", "unix://"]
)
def test_bad_urls_are_refused_with_a_hint(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


def test_explicit_url_beats_environment(tmp_path: Path) -> None:
    env = {"WANGEN_URL": "tcp://127.0.0.1:1", "WANGEN_STATE_DIR": str(tmp_path)}
    assert resolve_endpoint("unix:///x.sock", env).endpoint == Endpoint("unix", path="/x.sock")
    assert resolve_endpoint(None, env).endpoint == Endpoint("tcp", host="127.0.0.1", port=1)


def test_default_prefers_the_socket_when_it_exists(tmp_path: Path) -> None:
    env = {"WANGEN_STATE_DIR": str(tmp_path)}
    sock = tmp_path / "wangend.sock"
    missing = resolve_endpoint(None, env)
    assert missing.endpoint == Endpoint("tcp", host="127.0.0.1", port=DEFAULT_PORT)
    # The error message names both places it looked.
    assert missing.where == f"unix://{sock} or tcp://127.0.0.1:{DEFAULT_PORT}"
    sock.touch()
    assert resolve_endpoint(None, env).endpoint == Endpoint("unix", path=str(sock))


def test_wangen_socket_moves_the_default(tmp_path: Path) -> None:
    sock = tmp_path / "elsewhere.sock"
    sock.touch()
    env = {"WANGEN_SOCKET": str(sock)}
    assert resolve_endpoint(None, env).endpoint == Endpoint("unix", path=str(sock))


def test_token_file_lookup(tmp_path: Path) -> None:
    assert resolve_token_file("/t/a", {"WANGEN_TOKEN_FILE": "/t/b"}) == Path("/t/a")
    assert resolve_token_file(None, {"WANGEN_TOKEN_FILE": "/t/b"}) == Path("/t/b")
    assert resolve_token_file(None, {"WANGEN_STATE_DIR": str(tmp_path)}) == tmp_path / "token"
