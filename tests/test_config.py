"""Config resolution and the state-dir guards, as an operator meets them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wangend.config import ConfigError, load_config
from wangend.server.statedir import StartupError, StateLock, load_or_create_token


def test_defaults_follow_xdg(tmp_path: Path) -> None:
    cfg = load_config(None, env={"HOME": str(tmp_path)})
    assert cfg.state_dir == str(tmp_path / ".local/state/wangend")
    assert cfg.output_dir == str(tmp_path / "Videos/wangend")
    assert cfg.socket == str(tmp_path / ".local/state/wangend/wangend.sock")
    assert (cfg.host, cfg.port, cfg.model, cfg.max_attempts) == ("127.0.0.1", 7870, "tiny", 2)


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('port = 9000\nmodel = "wan2.1-t2v-1.3b"\nstate_dir = "/srv/wangend"\n')
    env = {"HOME": str(tmp_path), "WANGEN_PORT": "9100"}
    cfg = load_config(path, {"model": "tiny", "host": None}, env=env)
    assert cfg.port == 9100  # env beats the file
    assert cfg.model == "tiny"  # a flag beats both
    assert cfg.state_dir == "/srv/wangend"
    assert cfg.socket == "/srv/wangend/wangend.sock"  # follows the state dir


def test_unknown_or_wrong_keys_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("prot = 9000\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(path, env={"HOME": str(tmp_path)})
    path.write_text('max_attempts = "two"\n')
    with pytest.raises(ConfigError, match=r"max_attempts"):
        load_config(path, env={"HOME": str(tmp_path)})
    path.write_text("port = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={"HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={"HOME": str(tmp_path)})


def test_token_is_created_private_and_refused_when_readable(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token = load_or_create_token(token_file)
    assert len(token) >= 32
    assert (token_file.stat().st_mode & 0o777) == 0o600
    assert load_or_create_token(token_file) == token  # stable across restarts
    os.chmod(token_file, 0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        load_or_create_token(token_file)


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    first = StateLock(tmp_path)
    first.acquire()
    second = StateLock(tmp_path)
    with pytest.raises(StartupError, match=str(os.getpid())) as info:
        second.acquire()
    assert info.value.exit_code == 3
    first.release()
    second.acquire()  # free again once the holder is gone
    second.release()
