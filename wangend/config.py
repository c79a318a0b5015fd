"""ServerConfig: the one place daemon options are defined, parsed and resolved.

Precedence, lowest first: built-in defaults, the TOML file (`--config`, else
`$WANGEN_CONFIG`, else `$XDG_CONFIG_HOME/wangend/config.toml` when it exists), then
environment variables, then command-line flags. Unknown keys, in the file's [tables] too,
are rejected with the key's path (`media.crf2`), so a typo never silently does nothing.

Environment: `WANGEN_HOST`, `_PORT`, `_SOCKET`, `_STATE_DIR`, `_OUTPUT_DIR`, `_MODEL`,
`_DEVICE`, `_DTYPE`, `_LOG_LEVEL`, `_MAX_ATTEMPTS`, `_STOP_GRACE` for the top-level keys,
and `WANGEN_<TABLE>__<KEY>` (double underscore) for a table's key, e.g.
`WANGEN_MEDIA__CRF=20` or `WANGEN_ENGINE__FP8=true`; lists split on `:`.
`load_config_sources` also says which source set each key, for `wangend config show`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
from msgspec import Meta, Struct

from .locations import default_output_dir, default_socket_path, default_state_dir
from .protocol import DEFAULT_PORT, MAX_LINE_BYTES

__all__ = [
    "ConfigError",
    "ConfigValue",
    "EngineConfig",
    "EnhancerConfig",
    "LoraConfig",
    "MatAnyOneConfig",
    "MediaConfig",
    "ModelFiles",
    "ServerConfig",
    "effective_values",
    "load_config",
    "load_config_sources",
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
    # Resume points (pipelines/resume.py): a job cut off goes on from its last one.
    resume: bool = True
    resume_every: Annotated[float, Meta(ge=0.0, le=86400.0)] = 60.0  # s of denoising; 0: each step


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


class ModelFiles(Section):
    """[models.NAME]: a model made of single-file Wan transformer checkpoints (the files
    ComfyUI and Wan2GP keep, e.g. `wan2.1_t2v_14B_bf16.safetensors`) on top of a `base`
    model that supplies everything else: text encoder, tokenizer, VAE, scheduler, image
    encoder, the transformer's config and the family's rules. Jobs name it as NAME."""

    base: Annotated[str, Meta(min_length=1)]  # any model name a job could give
    # a .safetensors file, original Wan or diffusers layout; a relative path is read from
    # the daemon's working directory (`/` under systemd): prefer absolute or `~/...`
    transformer: Annotated[str, Meta(min_length=1)]
    transformer_2: str = ""  # Wan 2.2 A14B: the low-noise expert's file
    description: str = ""


# A [models.NAME] name: letters, digits, '.', '_', '-' (safe to type in any shell).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ServerConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT
    tcp: bool = True  # listen on TCP at all (the Unix socket is always on unless socket="")
    socket: str = ""  # Unix socket path; resolved to the default when empty
    state_dir: str = ""
    output_dir: str = ""
    model: str = "tiny"  # default model for jobs that name none
    # auto | cpu | cuda | cuda:N | mps: checked here so `config check` refuses "gpu0"; whether
    # the machine has that device is checked when the daemon starts.
    device: Annotated[str, Meta(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 2
    max_line_bytes: Annotated[int, Meta(ge=1024)] = MAX_LINE_BYTES
    event_buffer: Annotated[int, Meta(ge=16)] = 10_000  # ring buffer kept for `since`
    subscriber_buffer: Annotated[int, Meta(ge=16)] = 4_096  # events queued per connection
    # seconds a TCP connection has to `auth` before it is closed (0: no limit); the token
    # is all that guards TCP, so a peer without it must not keep a connection open.
    auth_timeout: Annotated[float, Meta(ge=0.0, le=86_400.0)] = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    no_socket: bool = False  # disable the Unix socket listener
    # Folders job inputs (images, videos, masks, audio) must lie in; empty: any file the
    # daemon can read (see media/access.py).
    input_folders: list[str] = msgspec.field(default_factory=list)
    # seconds a running job may take to finish on SIGTERM / `shutdown` before it is
    # put back in the queue; 0 requeues it at once. Keep below systemd's TimeoutStopSec.
    stop_grace: Annotated[float, Meta(ge=0.0, le=86_400.0)] = 0.0
    engine: EngineConfig = EngineConfig()
    media: MediaConfig = MediaConfig()
    lora: LoraConfig = LoraConfig()
    enhancer: EnhancerConfig = EnhancerConfig()
    matanyone: MatAnyOneConfig = MatAnyOneConfig()
    models: dict[str, ModelFiles] = msgspec.field(default_factory=dict)

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


# Top-level keys an environment variable may set; nested keys use
# WANGEN_<SECTION>__<KEY> (double underscore), e.g. WANGEN_MEDIA__CRF=20.
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
    "WANGEN_MAX_ATTEMPTS": "max_attempts",
    "WANGEN_STOP_GRACE": "stop_grace",
}
_SECTIONS: dict[str, type[Section]] = {
    "engine": EngineConfig,
    "media": MediaConfig,
    "lora": LoraConfig,
    "enhancer": EnhancerConfig,
    "matanyone": MatAnyOneConfig,
}
_FLAG_NAMES = {"tcp": "--no-tcp"}  # flags whose name is not --<key-with-dashes>
_ERROR_PATH = re.compile(r"`\$\.([A-Za-z0-9_.]+)`")


class ConfigValue(Struct, frozen=True, kw_only=True):
    """One effective setting for `wangend config show`: where it came from, in words
    an operator can act on ("default", "file /etc/wangend.toml", "env WANGEN_PORT",
    "flag --port")."""

    key: str  # "port", "media.crf"
    value: Any
    source: str


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
    return load_config_sources(path, overrides, env)[0]


def load_config_sources(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[ServerConfig, dict[str, str]]:
    """The effective config and, per key path given anywhere ("port", "media.crf"),
    the source that set it last; keys missing from the map are defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    cfg_path = Path(path).expanduser() if path else default_config_path(env)
    if cfg_path is not None:
        data = _read_toml(cfg_path)
        _check_keys(data, f"in {cfg_path}")
        _merge(values, sources, data, f"file {cfg_path}")
    _merge(values, sources, _env_values(env), None)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(given, "given as a flag")
    for key, value in given.items():
        values[key] = value
        sources[key] = "flag " + _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
    try:
        config = msgspec.convert(values, ServerConfig, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), sources)) from None
    return resolve_paths(config, env), sources


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _fields(struct: type[Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.name: f for f in msgspec.structs.fields(struct)}


def _check_keys(data: Mapping[str, Any], where: str) -> None:
    """Reject unknown keys, also inside the [tables], naming the key's full path."""
    top = _fields(ServerConfig)
    for key, value in data.items():
        if key not in top:
            raise ConfigError(f"unknown key {key} {where}")
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} {where} must be a table ([{key}])")
            known = _fields(_SECTIONS[key])
            for sub in value:
                if sub not in known:
                    raise ConfigError(f"unknown key {key}.{sub} {where}")
        if key == "models":
            _check_models(value, where)


def _check_models(models: Any, where: str) -> None:
    """[models.NAME] tables: a usable name each, and only ModelFiles' keys."""
    if not isinstance(models, Mapping):
        raise ConfigError(f"models {where} must hold tables ([models.NAME])")
    known = _fields(ModelFiles)
    for name, table in models.items():
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(
                f"models.{name} {where}: a model name is letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"models.{name} {where} must be a table ([models.{name}])")
        for sub in table:
            if sub not in known:
                raise ConfigError(f"unknown key models.{name}.{sub} {where}")
        for need in ("base", "transformer"):
            if need not in table:
                raise ConfigError(f"models.{name} {where} needs {need} = ...")
        try:  # here, where the table's name is known: msgspec says only `$.models[...]`
            msgspec.convert(table, ModelFiles)
        except msgspec.ValidationError as exc:
            text, _, path = str(exc).partition(" - at `$.")
            raise ConfigError(
                f"invalid value for models.{name}.{path.rstrip('`')} {where}: {text}"
            ) from None


def _merge(
    values: dict[str, Any], sources: dict[str, str], data: Mapping[str, Any], source: str | None
) -> None:
    """Lay `data` over `values`, table by table. `source` None: `data` maps each key to
    (value, source) pairs (the environment, where every key has its own variable)."""
    for key, item in data.items():
        if key == "models":  # only a file sets them; each table is taken whole
            merged = dict(values.get(key) or {})
            for name, table in item.items():
                merged[name] = table
                for sub in table:
                    sources[f"models.{name}.{sub}"] = source or "?"
            values[key] = merged
            continue
        if key in _SECTIONS:
            table = dict(values.get(key) or {})
            for sub, sub_item in item.items():
                value, origin = (sub_item, source) if source else sub_item
                table[sub] = value
                sources[f"{key}.{sub}"] = origin
            values[key] = table
            continue
        value, origin = (item, source) if source else item
        values[key] = value
        sources[key] = origin


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """WANGEN_* variables as {key: (value, "env NAME")}, {section: {key: (...)}}; each
    value converted to its field's type here, so a bad one names its variable."""
    out: dict[str, Any] = {}
    top = _fields(ServerConfig)
    for var, key in _ENV_KEYS.items():
        if env.get(var):
            out[key] = (_coerce(env[var], top[key], var), f"env {var}")
    for var in sorted(env):
        if not var.startswith("WANGEN_") or "__" not in var or not env[var]:
            continue
        section, _, key = var[len("WANGEN_") :].lower().partition("__")
        if section not in _SECTIONS or key not in _fields(_SECTIONS[section]):
            raise ConfigError(f"unknown key {section}.{key} (from ${var})")
        field = _fields(_SECTIONS[section])[key]
        out.setdefault(section, {})[key] = (_coerce(env[var], field, var), f"env {var}")
    return out


def _coerce(raw: str, field: msgspec.structs.FieldInfo, var: str) -> Any:
    info = msgspec.inspect.type_info(field.type)
    if isinstance(info, msgspec.inspect.ListType):
        return [part for part in raw.split(os.pathsep) if part]
    try:
        return msgspec.convert(raw, field.type, strict=False)
    except msgspec.ValidationError as exc:
        why = _PATTERN_HINTS.get(field.name, str(exc)) if "regex" in str(exc) else str(exc)
        raise ConfigError(f"${var}={raw!r} is not a valid {field.name}: {why}") from None


# What to write instead of a value a pattern refused, per key.
_PATTERN_HINTS = {"device": "not a device; use auto, cpu, cuda, cuda:N or mps"}


def _explain(message: str, sources: Mapping[str, str]) -> str:
    """msgspec's `... - at `$.media.crf`` as `media.crf (file /x.toml): ...`."""
    match = _ERROR_PATH.search(message)
    if match is None:
        return f"invalid config: {message}"
    key = match.group(1)
    text = message[: match.start()].removesuffix(" - at ").strip()
    if "regex" in text and key in _PATTERN_HINTS:  # a hint reads better than the regex
        text = _PATTERN_HINTS[key]
    origin = sources.get(key, "default")
    return f"invalid value for {key} ({origin}): {text}"


def effective_values(config: ServerConfig, sources: Mapping[str, str]) -> list[ConfigValue]:
    """Every setting, nested tables flattened to "section.key", with its source."""
    derived = {"socket": "default (in the state dir)"}
    out: list[ConfigValue] = []
    for key, value in msgspec.structs.asdict(config).items():
        if key == "models":
            for name, files in value.items():
                for sub, sub_value in msgspec.structs.asdict(files).items():
                    path = f"models.{name}.{sub}"
                    source = sources.get(path, "default")
                    out.append(ConfigValue(key=path, value=sub_value, source=source))
            continue
        if isinstance(value, Section):
            for sub, sub_value in msgspec.structs.asdict(value).items():
                path = f"{key}.{sub}"
                out.append(
                    ConfigValue(key=path, value=sub_value, source=sources.get(path, "default"))
                )
            continue
        source = sources.get(key, derived.get(key, "default"))
        out.append(ConfigValue(key=key, value=value, source=source))
    return out


def resolve_paths(config: ServerConfig, env: Mapping[str, str]) -> ServerConfig:
    """Fill the empty path fields with the defaults that wangenctl also computes."""
    state = Path(config.state_dir).expanduser() if config.state_dir else default_state_dir(env)
    sub_env = {**env, "WANGEN_STATE_DIR": str(state)}
    output = Path(config.output_dir).expanduser() if config.output_dir else None
    socket = Path(config.socket).expanduser() if config.socket else None
    models = {
        name: msgspec.structs.replace(
            files,
            transformer=_absolute(files.transformer),
            transformer_2=_absolute(files.transformer_2) if files.transformer_2 else "",
        )
        for name, files in config.models.items()
    }
    return msgspec.structs.replace(
        config,
        models=models,
        state_dir=str(state.absolute()),
        output_dir=str((output or default_output_dir(env)).absolute()),
        socket=str((socket or default_socket_path(sub_env)).absolute()),
    )


def _absolute(path: str) -> str:
    """A file path as jobs record it: `~` expanded, relative to the working directory,
    lexically normalised (symlinks kept)."""
    return os.path.abspath(os.path.expanduser(path))
