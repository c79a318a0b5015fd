"""The network's key layout against the published checkpoint's, and the engine's memory."""

from __future__ import annotations

import msgspec
import pytest
import torch

from wangend.matting.config import OFFICIAL, TINY, MemoryConfig
from wangend.matting.engine import MattingEngine, similarity, top_k_softmax
from wangend.matting.network import MatAnyOneNet
from wangend.matting.weights import build_network

from .official_keys import official_keys


def test_tiny_network_has_exactly_the_official_key_names() -> None:
    tiny = MatAnyOneNet(TINY).state_dict()
    assert set(tiny) == set(official_keys())
    assert len(tiny) == 562


def test_official_sizes_give_the_official_shapes_and_parameter_count() -> None:
    with torch.device("meta"):
        net = MatAnyOneNet(OFFICIAL)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = official_keys()
    wrong = {k: (shapes[k], expected[k]) for k in expected if shapes.get(k) != expected[k]}
    assert not wrong
    params = sum(p.numel() for p in net.parameters())
    assert 35.1e6 < params < 35.3e6  # the paper's 35.2 M (aux head included)


def test_inconsistent_sizes_are_refused_by_name() -> None:
    bad = msgspec.structs.replace(TINY, embed_dim=32)
    with pytest.raises(ValueError, match="up_dims"):
        MatAnyOneNet(bad)


def test_top_k_is_capped_at_the_tokens_in_memory() -> None:
    sim = torch.randn(1, 5, 7)  # 5 memory tokens, 7 query pixels
    aff = top_k_softmax(sim, top_k=30)
    assert torch.allclose(aff.sum(1), torch.ones(1, 7))
    aff2 = top_k_softmax(sim, top_k=2)
    assert int((aff2 > 0).sum(1).max()) == 2


def test_similarity_prefers_the_matching_key() -> None:
    mem = torch.eye(4)[None]  # 4 tokens, each a unit key
    query = torch.tensor([[0.0], [0.0], [1.0], [0.0]])[None]
    sim = similarity(mem, torch.ones(1, 1, 4), query, torch.ones(1, 4, 1))
    assert int(sim[0, :, 0].argmax()) == 2


def test_engine_gives_alpha_in_range_and_bounds_its_memory() -> None:
    net, _ = build_network("tiny")
    memory = MemoryConfig(mem_every=2, max_mem_frames=3, top_k=30)
    engine = MattingEngine(net, memory)
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(32, 48)
    mask[8:24, 10:30] = 1
    alphas = [engine.first(torch.rand(3, 32, 48, generator=gen), mask, warmup=2)]
    for _ in range(9):
        alphas.append(engine.step(torch.rand(3, 32, 48, generator=gen)))
    for a in alphas:
        assert a.shape == (32, 48)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # 6 tokens per frame (2x3 at stride 16), never more than 3 frames remembered
    assert engine.memory_tokens() == 3 * 6
    assert len(engine.work.frames) == 3


def test_tiny_network_is_deterministic_per_seed() -> None:
    a, _ = build_network("tiny", seed=3)
    b, _ = build_network("tiny", seed=3)
    c, _ = build_network("tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
