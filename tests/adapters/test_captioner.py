"""The Florence-2 captioner on a tiny random Florence-2 built here (offline, fixed seed,
saved as safetensors in transformers' native layout), alone and inside the local prompt
enhancer for an image-conditioned job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wangend.adapters import prompt_enhancer
from wangend.adapters.captioner import TASK, Florence2Captioner
from wangend.adapters.prompt_enhancer import EnhanceContext, PromptEnhancerBridge
from wangend.config import EnhancerConfig

from .tiny_models import FLORENCE_IMAGE_TOKENS, write_tiny_florence2, write_tiny_lm

PROMPT = "a fox in the snow"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """256 beam-search steps of a toy model are all overhead: a second torch thread
    fighting for a shared 2-core machine makes them ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_florence2(tmp_path_factory.mktemp("tiny_florence2"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "start.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def test_caption_is_a_deterministic_string(florence: Path, image: Path) -> None:
    captioner = Florence2Captioner(str(florence))
    from PIL import Image

    inputs = captioner.processor(text=TASK, images=Image.open(image), return_tensors="pt")
    assert (inputs["input_ids"] == captioner.processor.image_token_id).sum() == (
        FLORENCE_IMAGE_TOKENS
    )
    first = captioner.caption(image)
    assert isinstance(first, str) and first
    assert captioner.caption(image) == first
    assert Florence2Captioner(str(florence)).caption(image) == first  # beam search, no sampling
    maps = Path("/proc/self/maps")  # on the host, it is not its files' pages
    assert not maps.is_file() or str(florence.resolve()) not in maps.read_text()


def test_caption_falls_back_to_plain_text_when_parsing_fails(florence: Path, image: Path) -> None:
    captioner = Florence2Captioner(str(florence), max_new_tokens=16)
    # A processor saved without `post_processor_config`: transformers raises on `pure_text`.
    captioner.processor.post_processor.parse_task_config = {}
    with pytest.raises(ValueError, match="Unsupported parse task"):
        captioner.processor.post_process_generation("x", task=TASK, image_size=(40, 30))
    outputs: list[torch.Tensor] = []
    generate = captioner.model.generate

    def spy(**kw) -> torch.Tensor:
        outputs.append(generate(**kw))
        return outputs[-1]

    captioner.model.generate = spy  # type: ignore[method-assign]
    caption = captioner.caption(image)
    decode = captioner.processor.batch_decode
    assert "<loc_" in decode(outputs[0], skip_special_tokens=False)[0]  # what parsing would keep
    assert caption == decode(outputs[0], skip_special_tokens=True)[0].strip()


def test_enhancer_passes_the_caption_to_the_llm(
    florence: Path, tiny_lm: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users: list[str] = []
    chat = prompt_enhancer.LocalChatModel.chat

    def spy(self, system: str, user: str, **kw) -> str:
        users.append(user)
        return chat(self, system, user, **kw)

    monkeypatch.setattr(prompt_enhancer.LocalChatModel, "chat", spy)
    config = EnhancerConfig(
        provider="local", local_model=str(tiny_lm), max_new_tokens=12, captioner_model=str(florence)
    )
    context = EnhanceContext(family="wan2.1-i2v", image=str(image), seed=3)
    [result] = PromptEnhancerBridge(config).enhance([PROMPT], context)
    assert result.ok and result.reason is None, result.reason
    assert isinstance(result.caption, str) and result.caption
    assert result.caption == Florence2Captioner(str(florence)).caption(image)
    assert result.record()["caption"] == result.caption
    assert users == [f"Image description: {result.caption}\n\nRequest: {PROMPT}"]
