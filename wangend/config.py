"""ServerConfig: the one place daemon options are defined, parsed and resolved.

Precedence, lowest first: built-in defaults, the TOML file (`--config`, else
`$WANGEN_CONFIG`, else `$XDG_CONFIG_HOME/wangend/config.toml` when it exists), then
environment variables (`WANGEN_*`), then command-line flags. Unknown keys in the file are
rejected with the key's path, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .protocol import (
    DEFAULT_PORT,
    MAX_LINE_BYTES,
    default_output_dir,
    default_socket_path,
    default_state_dir,
)

__all__ = [
    "ConfigError",
    "EngineConfig",
    "EnhancerConfig",
    "LoraConfig",
    "MatAnyOneConfig",
    "MediaConfig",
    "ServerConfig",
    "load_config",
]


class ConfigError(Exception):
    """A config file or value is wrong; the message names the key."""


class Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the config file's [tables]: unknown keys are errors there too."""


class EngineConfig(Section):
    """[engine]: daemon-wide defaults for what a job may override per job."""

    memory_profile: Literal["none", "model", "group", "sequential"] = "none"
    fp8: bool = False
    step_cache: Literal["none", "fbc", "mag", "taylorseer", "pab"] = "none"
    step_cache_threshold: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    attention: Literal["native", "flash", "sage"] = "native"
    compile: bool = False
    preview_every: Annotated[int, Meta(ge=0, le=500)] = 0
    keep_models_gb: Annotated[float, Meta(ge=0.0)] = 0.0  # CPU RAM for parked models


class MediaConfig(Section):
    """[media]: how outputs are written."""

    codec: Literal["libx264", "libx265", "h264_nvenc"] = "libx264"
    crf: Annotated[int, Meta(ge=0, le=51)] = 18
    pix_fmt: Literal["yuv420p", "yuv444p"] = "yuv420p"
    container: Literal["mp4", "mkv"] = "mp4"
    image_format: Literal["png", "jpeg", "webp"] = "png"
    image_quality: Annotated[int, Meta(ge=1, le=100)] = 95
    metadata: Literal["embedded", "json", "none"] = "embedded"
    embed_source_images: bool = False
    save_masks: bool = False
    write_retries: Annotated[int, Meta(ge=0, le=20)] = 3


class LoraConfig(Section):
    """[lora]: where LoRAs live (a folder per model family below each root)."""

    folders: list[str] = msgspec.field(default_factory=list)  # default: <state>/loras
    presets: list[str] = msgspec.field(default_factory=list)  # default: <state>/presets
    cache_budget: Annotated[int, Meta(ge=0, le=256)] = 8  # LoRAs kept loaded, inactive


class EnhancerConfig(Section):
    """[enhancer]: the prompt enhancer."""

    provider: Literal["none", "local", "remote"] = "none"
    by_default: bool = False  # enhance jobs that do not say
    local_model: str = ""  # hub id or folder of a causal LM with a chat template
    captioner_model: str = ""  # Florence-2 for image-conditioned jobs
    remote_url: str = ""  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    remote_model: str = ""
    api_key_env: str = "WANGEN_ENHANCER_API_KEY"
    api_key_file: str = ""
    timeout: Annotated[float, Meta(gt=0.0, le=600.0)] = 60.0
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    idle_unload: Annotated[float, Meta(ge=0.0)] = 600.0  # seconds; 0 keeps it loaded
    max_new_tokens: Annotated[int, Meta(ge=1, le=4096)] = 256


class MatAnyOneConfig(Section):
    """[matanyone]: the matting network's weights ("tiny": random, for tests/demo)."""

    weights: str = "tiny"


class ServerConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT
    tcp: bool = True  # listen on TCP at all (the Unix socket is always on unless socket="")
    socket: str = ""  # Unix socket path; resolved to the default when empty
    state_dir: str = ""
    output_dir: str = ""
    model: str = "tiny"  # default model for jobs that name none
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 2
    max_line_bytes: Annotated[int, Meta(ge=1024)] = MAX_LINE_BYTES
    event_buffer: Annotated[int, Meta(ge=16)] = 10_000  # ring buffer kept for `since`
    subscriber_buffer: Annotated[int, Meta(ge=16)] = 4_096  # events queued per connection
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    no_socket: bool = False  # disable the Unix socket listener
    engine: EngineConfig = EngineConfig()
    media: MediaConfig = MediaConfig()
    lora: LoraConfig = LoraConfig()
    enhancer: EnhancerConfig = EnhancerConfig()
    matanyone: MatAnyOneConfig = MatAnyOneConfig()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @property
    def token_path(self) -> Path:
        return Path(self.state_dir) / "token"

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "queue.sqlite3"

    @property
    def models_path(self) -> Path:
        return Path(self.state_dir) / "models"


_ENV_KEYS = {
    "WANGEN_HOST": "host",
    "WANGEN_PORT": "port",
    "WANGEN_SOCKET": "socket",
    "WANGEN_STATE_DIR": "state_dir",
    "WANGEN_OUTPUT_DIR": "output_dir",
    "WANGEN_MODEL": "model",
    "WANGEN_DEVICE": "device",
    "WANGEN_DTYPE": "dtype",
    "WANGEN_LOG_LEVEL": "log_level",
}


def default_config_path(env: Mapping[str, str]) -> Path | None:
    if env.get("WANGEN_CONFIG"):
        return Path(env["WANGEN_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    candidate = Path(base).expanduser() / "wangend" / "config.toml"
    return candidate if candidate.exists() else None


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Build the effective config. `overrides` are CLI values; None means "not given"."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    cfg_path = Path(path).expanduser() if path else default_config_path(env)
    if cfg_path is not None:
        try:
            values.update(tomllib.loads(cfg_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"config file {cfg_path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {exc}") from None
    for var, key in _ENV_KEYS.items():
        if env.get(var):
            values[key] = int(env[var]) if key == "port" and env[var].isdigit() else env[var]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    try:
        config = msgspec.convert(values, ServerConfig, str_keys=True)
    except msgspec.ValidationError as exc:
        where = f" in {cfg_path}" if cfg_path else ""
        raise ConfigError(f"invalid config{where}: {exc}") from None
    return resolve_paths(config, env)


def resolve_paths(config: ServerConfig, env: Mapping[str, str]) -> ServerConfig:
    """Fill the empty path fields with the defaults that wangenctl also computes."""
    state = Path(config.state_dir).expanduser() if config.state_dir else default_state_dir(env)
    sub_env = {**env, "WANGEN_STATE_DIR": str(state)}
    output = Path(config.output_dir).expanduser() if config.output_dir else None
    socket = Path(config.socket).expanduser() if config.socket else None
    return msgspec.structs.replace(
        config,
        state_dir=str(state.absolute()),
        output_dir=str((output or default_output_dir(env)).absolute()),
        socket=str((socket or default_socket_path(sub_env)).absolute()),
    )
