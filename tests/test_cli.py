"""`wangend`'s own command line: help that shows what each option takes, and usage
errors as one plain line, as wangenctl's are (startup errors are in tests/e2e)."""

from __future__ import annotations

from typer.testing import CliRunner

from wangend.cli import app

runner = CliRunner()


def test_help_shows_flags_as_flags() -> None:
    for command in (["serve"], ["config", "show"], ["install-units"], ["history"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, result.output
        flags = [line for line in result.output.splitlines() if "--help" in line]
        flags += [line for line in result.output.splitlines() if "--no-tcp" in line]
        assert flags and not any("<bool>" in line for line in flags), result.output


def test_a_usage_error_is_a_plain_line() -> None:
    result = runner.invoke(app, ["history", "--since", "soon"])
    assert result.exit_code == 2
    assert "╭" not in result.output and "│" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert lines == [
        "Error: Invalid value for --since: 'soon' is neither Unix seconds nor an ISO 8601 "
        "date or time"
    ]


def test_token_takes_the_state_dir_serve_was_given(tmp_path) -> None:
    result = runner.invoke(app, ["token", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "state" / "token")
