"""Prompt enhancing through a real daemon whose enhancer is a real HTTP server on
127.0.0.1: the job record keeps both prompts, a retry reuses the enhanced one, and a
failing enhancer costs the job nothing but the enhancement."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..adapters.chat_server import Server
from ..support.harness import DaemonProcess
from ..support.outputs import decode_frames
from ..support.wire import job_event

TERMINAL = ("job.succeeded", "job.failed", "job.aborted")
SPEC = {"prompt": "a fox", "width": 32, "height": 32, "frames": 5, "steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def chat() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def enhanced_daemon(
    tmp_path_factory: pytest.TempPathFactory, chat: Server
) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("enhancer")
    config = root / "config.toml"
    config.write_text(
        f'[enhancer]\nprovider = "remote"\nremote_url = "{chat.url}"\n'
        'remote_model = "writer"\ntimeout = 5.0\nretries = 0\n'
    )
    proc = DaemonProcess(root, "--config", str(config)).start()
    yield proc
    proc.stop()


def run(daemon: DaemonProcess, method: str, params: dict) -> tuple[dict, list[dict]]:
    with daemon.unix() as client:
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        job = client.result(method, params)["job"]
        final = client.wait_event(job_event(job, *TERMINAL))
        record = client.result("status", {"job": job})
    return final, [record, *[e for e in client.seen if e.get("job") == job]]


def test_enhanced_prompt_is_recorded_in_the_job_and_the_output(
    enhanced_daemon: DaemonProcess, chat: Server
) -> None:
    chat.mode = "ok"
    final, (record, *events) = run(enhanced_daemon, "enqueue", {**SPEC, "enhance_prompt": True})
    assert final["type"] == "job.succeeded", final
    spec = record["spec"]
    assert spec["prompt"] == "A fox trots." and spec["original_prompt"] == "a fox"
    assert spec["enhancer"]["ok"] is True and spec["enhancer"]["provider"] == "remote"
    assert any(e["type"] == "job.updated" for e in events)
    settings = json.loads(decode_frames(final["data"]["outputs"][0])[1]["comment"])["settings"]
    assert settings["prompt"] == "A fox trots." and settings["original_prompt"] == "a fox"


def test_a_retry_reuses_the_enhanced_prompt(enhanced_daemon: DaemonProcess, chat: Server) -> None:
    """A job aborted after its prompt was enhanced: the retry runs the enhanced prompt
    and does not ask the enhancer again (the same job, reproducibly)."""
    chat.mode = "ok"
    long = {**SPEC, "steps": 60, "enhance_prompt": True}
    with enhanced_daemon.unix() as client:
        client.result("subscribe", {"since": client.result("status")["last_seq"]})
        job = client.result("enqueue", long)["job"]
        client.wait_event(job_event(job, "job.updated"))
        client.result("abort", {"job": job})
        assert client.wait_event(job_event(job, *TERMINAL))["type"] == "job.aborted"
    asked = len(chat.requests)
    final, (retried, *_) = run(enhanced_daemon, "retry", {"job": job})
    assert final["type"] == "job.succeeded"
    assert retried["spec"]["prompt"] == "A fox trots."
    assert retried["spec"]["original_prompt"] == "a fox"
    assert len(chat.requests) == asked  # the enhancer was not asked again

    fresh, (asked_again, *_) = run(enhanced_daemon, "retry", {"job": job, "enhance": True})
    assert fresh["type"] == "job.succeeded"
    assert len(chat.requests) == asked + 1  # asked for a fresh one, from the original
    assert "a fox" in chat.requests[-1]["messages"][-1]["content"]
    assert asked_again["spec"]["original_prompt"] == "a fox"


def test_a_failing_enhancer_falls_back_to_the_original_prompt(
    enhanced_daemon: DaemonProcess, chat: Server
) -> None:
    chat.mode = "500"
    final, (record, *_) = run(enhanced_daemon, "enqueue", {**SPEC, "enhance_prompt": True})
    assert final["type"] == "job.succeeded"
    assert record["spec"]["prompt"] == "a fox"
    assert record["spec"]["enhancer"]["ok"] is False
    assert "500" in record["spec"]["enhancer"]["reason"]


def test_without_an_enhancer_asking_for_one_is_refused(tmp_path: Path) -> None:
    """The default daemon has no enhancer: the request names the field and says how."""
    from wangend.adapters.lora import LoRALibrary
    from wangend.adapters.presets import PresetLibrary
    from wangend.adapters.requests import AdapterRequests
    from wangend.config import EnhancerConfig
    from wangend.errors import InvalidParams
    from wangend.protocol import GenerateSpec

    requests = AdapterRequests(LoRALibrary([tmp_path]), PresetLibrary([tmp_path]), EnhancerConfig())
    with pytest.raises(InvalidParams) as info:
        requests.resolve(GenerateSpec(prompt="p", enhance_prompt=True), "wan2.1-t2v", "tiny")
    assert info.value.data["field"] == "$.params.enhance_prompt"
    assert "provider" in info.value.message
