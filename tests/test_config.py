"""Config resolution and the state-dir guards, as an operator meets them."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wangend.cli import app as cli_app
from wangend.config import ConfigError, effective_values, load_config, load_config_sources
from wangend.server.statedir import StartupError, StateLock, is_loopback, load_or_create_token


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
    path.write_text('device = "gpu0"\n')
    with pytest.raises(ConfigError, match=r"device \(file .*config\.toml\)"):
        load_config(path, env={"HOME": str(tmp_path)})
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        path.write_text(f'device = "{device}"\n')
        assert load_config(path, env={"HOME": str(tmp_path)}).device == device


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


def test_tables_reject_unknown_keys_by_path_and_env_reaches_them(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[media]\ncrf2 = 20\n")
    with pytest.raises(ConfigError, match=r"unknown key media\.crf2 in .*config\.toml"):
        load_config(path, env={"HOME": str(tmp_path)})
    path.write_text("media = 3\n")
    with pytest.raises(ConfigError, match=r"media .* must be a table"):
        load_config(path, env={"HOME": str(tmp_path)})
    path.write_text("[media]\ncrf = 99\n")
    with pytest.raises(ConfigError, match=r"media\.crf \(file .*config\.toml\): .*<= 51"):
        load_config(path, env={"HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"engine\.turbo \(from \$WANGEN_ENGINE__TURBO"):
        load_config(None, env={"HOME": str(tmp_path), "WANGEN_ENGINE__TURBO": "1"})
    with pytest.raises(ConfigError, match=r"\$WANGEN_STOP_GRACE='soon'"):
        load_config(None, env={"HOME": str(tmp_path), "WANGEN_STOP_GRACE": "soon"})


def test_every_value_says_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("port = 9000\nstop_grace = 20\n[media]\ncrf = 20\n[engine]\nfp8 = true\n")
    env = {
        "HOME": str(tmp_path),
        "WANGEN_MEDIA__CRF": "23",
        "WANGEN_LORA__FOLDERS": "/a:/b",
        "WANGEN_MAX_ATTEMPTS": "5",
    }
    cfg, sources = load_config_sources(path, {"host": "127.0.0.2", "port": None}, env=env)
    assert (cfg.media.crf, cfg.engine.fp8, cfg.lora.folders) == (23, True, ["/a", "/b"])
    assert (cfg.stop_grace, cfg.max_attempts, cfg.host) == (20.0, 5, "127.0.0.2")
    shown = {v.key: v.source for v in effective_values(cfg, sources)}
    assert shown["port"] == shown["stop_grace"] == shown["engine.fp8"] == f"file {path}"
    assert shown["media.crf"] == "env WANGEN_MEDIA__CRF"
    assert shown["max_attempts"] == "env WANGEN_MAX_ATTEMPTS"
    assert shown["host"] == "flag --host"
    assert shown["media.codec"] == shown["dtype"] == "default"
    assert load_config(None, env={"HOME": str(tmp_path)}).stop_grace == 0.0


def test_config_show_prints_toml_with_sources_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[media]\ncrf = 20\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANGEN_STOP_GRACE", "15")
    for var in ("WANGEN_CONFIG", "WANGEN_STATE_DIR", "XDG_CONFIG_HOME", "WANGEN_PORT"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(cli_app, ["config", "show", "--config", str(path), "--port", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(re.fullmatch(r"port = 1 +# flag --port", line) for line in lines)
    assert any(re.fullmatch(r"stop_grace = 15\.0 +# env WANGEN_STOP_GRACE", line) for line in lines)
    assert any(re.fullmatch(rf"crf = 20 +# file {re.escape(str(path))}", line) for line in lines)
    assert "[media]" in lines and "[engine]" in lines
    assert any(line.startswith("# step_cache_threshold (not set)") for line in lines)
    shown = CliRunner().invoke(cli_app, ["config", "show", "--config", str(path), "--json"])
    document = json.loads(shown.stdout)
    assert document["config"]["media"]["crf"] == 20
    assert document["sources"]["media.crf"] == f"file {path}"
    path.write_text("[media]\ncrf2 = 1\n")
    bad = CliRunner().invoke(cli_app, ["config", "show", "--config", str(path)])
    assert bad.exit_code == 2 and "unknown key media.crf2" in bad.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("192.168.1.20", False),
        ("gpu-box.example", False),
    ],
)
def test_which_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_tcp_beyond_loopback_warns_naming_the_address_and_needs_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from wangend.server.daemon import Daemon  # the daemon's module pulls in torch

    env = {"HOME": str(tmp_path)}
    exposed = load_config(None, {"host": "0.0.0.0", "state_dir": str(tmp_path)}, env=env)
    load_or_create_token(exposed.token_path)
    with caplog.at_level("WARNING", logger="wangend"):
        Daemon(exposed)._warn_if_exposed()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "TCP listens on 0.0.0.0" in warning and str(exposed.token_path) in warning
    caplog.clear()
    local = load_config(None, {"host": "127.0.0.1", "state_dir": str(tmp_path)}, env=env)
    Daemon(local)._warn_if_exposed()
    assert caplog.records == []
    exposed.token_path.unlink()
    with pytest.raises(StartupError, match="no token file"):
        Daemon(exposed)._warn_if_exposed()


def test_model_files_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[models.NAME] names transformer files on a base; paths become absolute, every
    mistake names its key, and `config show` prints tables a config file could hold."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(
        '[models."wan2.1-comfy"]\nbase = "wan2.1-t2v-14b"\n'
        'transformer = "ckpts/wan14b.safetensors"\n'
        '[models.a14b]\nbase = "wan2.2-t2v-a14b"\ntransformer = "~/high.safetensors"\n'
        'transformer_2 = "/models/low.safetensors"\n'
    )
    env = {"HOME": str(tmp_path)}
    cfg = load_config(path, env=env)
    comfy, a14b = cfg.models["wan2.1-comfy"], cfg.models["a14b"]
    assert comfy.transformer == str(tmp_path / "ckpts" / "wan14b.safetensors")
    assert comfy.transformer_2 == "" and comfy.base == "wan2.1-t2v-14b"
    assert a14b.transformer == str(Path("~/high.safetensors").expanduser())
    assert a14b.transformer_2 == "/models/low.safetensors"

    mistakes = {
        '[models.x]\ntransformer = "a.safetensors"\n': r"models\.x in .* needs base",
        '[models.x]\nbase = "tiny"\n': r"models\.x in .* needs transformer",
        '[models.x]\nbase = "tiny"\ntransformer = "a"\nvae = "v"\n': r"unknown key models\.x\.vae",
        '[models.x]\nbase = 3\ntransformer = "a"\n': r"models\.x\.base in .*: Expected `str`",
        '[models."my model"]\nbase = "tiny"\ntransformer = "a"\n': r"models\.my model .*letters",
        'models = "wan"\n': r"models in .* must hold tables",
    }
    for text, pattern in mistakes.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            load_config(path, env=env)

    path.write_text('[models."wan2.1-comfy"]\nbase = "tiny"\ntransformer = "/w.safetensors"\n')
    shown = CliRunner().invoke(cli_app, ["config", "show", "--config", str(path)])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert '[models."wan2.1-comfy"]' in lines
    assert any(re.fullmatch(rf'transformer = "/w.safetensors" +# file {re.escape(str(path))}', line)
               for line in lines)  # fmt: skip
    shown_text = "\n".join(line.split("#")[0] for line in lines)
    assert tomllib.loads(shown_text)["models"]["wan2.1-comfy"]["base"] == "tiny"

    path.write_text('[models.tiny]\nbase = "tiny"\ntransformer = "/w.safetensors"\n')
    checked = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path)])
    assert checked.exit_code == 2 and "tiny is the name of a built-in model" in checked.output


def test_config_check_says_which_model_files_cannot_be_used(tmp_path: Path) -> None:
    """The daemon starts with a broken [models.NAME] (jobs naming it are refused), so
    the check passes, but says which entry is broken and why."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[models.gone]\nbase = "tiny"\ntransformer = "{tmp_path / "nope.safetensors"}"\n'
    )
    checked = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "warning: models.gone: model gone: transformer file" in checked.stderr
    assert "no such file" in checked.stderr
    assert "1 of the models named cannot be used now" in checked.stdout
    (tmp_path / "half").mkdir()
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nmodel = "{tmp_path / "half"}"\n')
    default = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path)])
    assert default.exit_code == 0, default.output
    assert f"warning: model {tmp_path / 'half'} (the default): model folder" in default.stderr
    assert "missing model_index.json" in default.stderr
    path.write_text('[models.empty]\nbase = "tiny"\ntransformer = ""\n')
    empty = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path)])
    assert empty.exit_code == 2 and "models.empty.transformer" in empty.output
