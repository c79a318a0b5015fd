"""The public surface is what `__all__` says, and nothing slips in or out unnoticed."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

PUBLIC = {
    "wangenctl": {
        "AuthError",
        "Client",
        "DaemonUnavailable",
        "EventFollower",
        "ProtocolError",
        "RpcError",
        "WangenctlError",
        "connect",
    },
    "wangenctl.client": {
        "AuthError",
        "Client",
        "DaemonUnavailable",
        "ProtocolError",
        "RpcError",
        "WangenctlError",
        "connect",
    },
    "wangenctl.endpoint": {
        "Endpoint",
        "Resolved",
        "TcpTransport",
        "Transport",
        "UnixTransport",
        "parse_url",
        "read_token",
        "resolve_endpoint",
        "resolve_token_file",
        "transport_for",
    },
    "wangenctl.errors": {
        "AuthError",
        "DaemonUnavailable",
        "ProtocolError",
        "RpcError",
        "WangenctlError",
        "invalid_params_text",
        "translate_socket_errors",
    },
    "wangenctl.follower": {"EventFollower"},
    "wangenctl.render": {
        "ErrorReport",
        "EventView",
        "HumanRenderer",
        "JsonRenderer",
        "Renderer",
        "error_report",
        "format_seconds",
        "make_renderer",
    },
    "wangenctl.cli": {"app", "main"},
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_is_the_agreed_surface(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == PUBLIC[name]
    assert sorted(module.__all__) == list(module.__all__), "keep __all__ sorted"
    for attr in module.__all__:
        assert getattr(module, attr) is not None


@pytest.mark.parametrize(
    "name",
    [
        "wangenctl.client",
        "wangenctl.endpoint",
        "wangenctl.errors",
        "wangenctl.follower",
        "wangenctl.render",
    ],
)
def test_every_public_definition_is_exported(name: str) -> None:
    """A new public class or function must be added to `__all__` (or made private)."""
    module = importlib.import_module(name)
    defined = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert defined <= set(module.__all__), defined - set(module.__all__)


def test_the_error_tree() -> None:
    from wangenctl import errors

    for cls in (errors.DaemonUnavailable, errors.AuthError, errors.RpcError):
        assert issubclass(cls, errors.WangenctlError)
    assert issubclass(errors.ProtocolError, errors.WangenctlError)


def test_importing_the_cli_stays_light() -> None:
    """`wangenctl --help` must not pay for torch, diffusers, the server, rich or anyio."""
    code = (
        "import sys, wangenctl.cli; "
        "print(' '.join(m for m in ('torch', 'diffusers', 'wangend.server', 'wangend.queue', "
        "'rich', 'anyio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
