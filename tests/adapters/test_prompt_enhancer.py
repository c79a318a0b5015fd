"""The prompt enhancer: a tiny random chat LM built here (offline, fixed seed, saved as
safetensors) through the real local path, and the remote path against a real HTTP server
on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wangend.adapters.prompt_enhancer import EnhanceContext, PromptEnhancerBridge, clean_reply
from wangend.adapters.system_prompts import I2V_SYSTEM_PROMPT, T2V_SYSTEM_PROMPT
from wangend.config import EnhancerConfig
from wangend.protocol import GenerateSpec

from .chat_server import Server
from .tiny_models import write_tiny_lm

PROMPT = "a fox in the snow"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def local_config(folder: Path | str, **kw) -> EnhancerConfig:
    return EnhancerConfig(provider="local", local_model=str(folder), max_new_tokens=12, **kw)


def test_local_enhances_reproducibly(tiny_lm: Path) -> None:
    bridge = PromptEnhancerBridge(local_config(tiny_lm))
    [first] = bridge.enhance([PROMPT], EnhanceContext(family="wan2.1-t2v", seed=1))
    assert first.ok and first.reason is None, first.reason
    assert first.original == PROMPT and first.prompt and first.prompt != PROMPT
    assert first.record() == {"provider": "local", "model": str(tiny_lm), "ok": True}
    bridge.reset()
    again = PromptEnhancerBridge(local_config(tiny_lm)).enhance([PROMPT], EnhanceContext(seed=2))
    assert again[0].prompt == first.prompt  # greedy: the same prompt gives the same text


def test_local_sampling_follows_the_seed(tiny_lm: Path) -> None:
    bridge = PromptEnhancerBridge(local_config(tiny_lm), sample=True)
    a = bridge.enhance([PROMPT], EnhanceContext(seed=5))[0].prompt
    b = bridge.enhance([PROMPT], EnhanceContext(seed=5))[0].prompt
    c = [bridge.enhance([PROMPT], EnhanceContext(seed=s))[0].prompt for s in (6, 7, 8)]
    assert a == b and any(x != a for x in c)


def test_prime_loads_once_and_idle_unload_frees(tiny_lm: Path) -> None:
    clock = Clock()
    bridge = PromptEnhancerBridge(local_config(tiny_lm, idle_unload=60.0), clock=clock)
    bridge.prime(GenerateSpec(prompt=PROMPT))  # by_default is off: not wanted
    assert not bridge.loaded
    bridge.prime(GenerateSpec(prompt=PROMPT, enhance_prompt=True))
    assert bridge.loaded and bridge.loads == 1
    maps = Path("/proc/self/maps")  # warm on the host, it is not its files' pages
    assert not maps.is_file() or str(tiny_lm.resolve()) not in maps.read_text()
    bridge.enhance([PROMPT], EnhanceContext())
    clock.now += 59
    assert not bridge.maybe_unload() and bridge.loaded
    bridge.enhance([PROMPT], EnhanceContext())
    assert bridge.loads == 1  # still warm
    clock.now += 61
    assert bridge.maybe_unload() and not bridge.loaded
    bridge.prime(GenerateSpec(prompt=PROMPT, enhance_prompt=True))
    assert bridge.loads == 2


def test_local_failures_fall_back_to_the_original(tmp_path: Path) -> None:
    bridge = PromptEnhancerBridge(local_config(tmp_path / "no-such-model"))
    [result] = bridge.enhance([PROMPT], EnhanceContext())
    assert not result.ok and result.prompt == PROMPT and "could not load" in result.reason
    [result] = PromptEnhancerBridge(EnhancerConfig(provider="local")).enhance(
        [PROMPT], EnhanceContext()
    )
    assert not result.ok and "no local_model" in result.reason


def test_captioner_failure_is_recorded_and_enhancing_goes_on(tiny_lm: Path, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    config = local_config(tiny_lm, captioner_model=str(tmp_path / "no-florence"))
    [result] = PromptEnhancerBridge(config).enhance([PROMPT], EnhanceContext(image=str(image)))
    assert result.ok and result.caption is None and "captioner failed" in result.reason


def test_wants_and_none_provider() -> None:
    off = PromptEnhancerBridge(EnhancerConfig(provider="none", by_default=True))
    assert not off.wants(GenerateSpec(prompt=PROMPT, enhance_prompt=True))
    [result] = off.enhance([PROMPT], EnhanceContext())
    assert not result.ok and result.prompt == PROMPT
    on = PromptEnhancerBridge(EnhancerConfig(provider="remote", by_default=True))
    assert on.wants(GenerateSpec(prompt=PROMPT))
    assert not on.wants(GenerateSpec(prompt=PROMPT, enhance_prompt=False))


def test_clean_reply() -> None:
    assert clean_reply('  "Prompt: a fox runs"  ') == "Prompt: a fox runs"
    assert clean_reply("Prompt: a fox runs") == "a fox runs"
    assert clean_reply("'a fox'") == "a fox"


# --- remote ---------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


def remote(server: Server, **kw) -> PromptEnhancerBridge:
    config = EnhancerConfig(
        provider="remote", remote_url=server.url, remote_model="m", **{"timeout": 5.0, **kw}
    )
    return PromptEnhancerBridge(config, environ={"WANGEN_ENHANCER_API_KEY": "k3y"}, backoff=0.01)


def test_remote_success(server: Server, tmp_path: Path) -> None:
    [result] = remote(server).enhance([PROMPT], EnhanceContext(family="wan2.1-i2v", seed=9))
    assert result.ok and result.prompt == "A fox trots." and result.original == PROMPT
    request = server.requests[0]
    assert request["model"] == "m" and request["seed"] == 9 and request["temperature"] == 0.0
    assert request["messages"][0]["content"] == I2V_SYSTEM_PROMPT
    assert PROMPT in request["messages"][1]["content"]
    assert server.headers[0]["Authorization"] == "Bearer k3y"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    config = EnhancerConfig(provider="remote", remote_url=server.url, api_key_file=str(key_file))
    PromptEnhancerBridge(config, environ={}).enhance([PROMPT], EnhanceContext())
    assert server.headers[1]["Authorization"] == "Bearer from-file"
    assert server.requests[1]["messages"][0]["content"] == T2V_SYSTEM_PROMPT


def test_remote_retries_a_500_then_succeeds(server: Server) -> None:
    server.mode = "flaky"
    [result] = remote(server, retries=2).enhance([PROMPT], EnhanceContext())
    assert result.ok and len(server.requests) == 2


@pytest.mark.parametrize(
    ("mode", "retries", "tries", "words"),
    [
        ("500", 2, 3, "HTTP 500"),
        ("slow", 0, 1, "no answer"),
        ("malformed", 2, 1, "not a chat completion"),
        ("401", 2, 1, "HTTP 401"),
    ],
)
def test_remote_failures_fall_back(
    server: Server, mode: str, retries: int, tries: int, words: str
) -> None:
    server.mode = mode
    [result] = remote(server, retries=retries, timeout=0.3).enhance([PROMPT], EnhanceContext())
    assert not result.ok and result.prompt == PROMPT and words in result.reason
    assert "k3y" not in result.reason
    assert len(server.requests) == tries


def test_remote_unreachable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    config = EnhancerConfig(provider="remote", remote_url=f"http://127.0.0.1:{port}/v1", retries=1)
    [result] = PromptEnhancerBridge(config, backoff=0.01).enhance([PROMPT], EnhanceContext())
    assert not result.ok and "cannot reach" in result.reason and "2 tries" in result.reason
