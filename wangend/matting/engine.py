"""Frame-by-frame matting with the network's three memories.

* Working memory: keys, shrinkage and mask values of remembered frames. The first frame
  is permanent; another frame is added every `mem_every` frames and the oldest
  non-permanent one is dropped beyond `max_mem_frames`. Each query pixel reads a softmax
  over its `top_k` best-matching memory tokens; `top_k` is capped at the number of
  tokens held, since asking for more than exist is an error.
* Sensory memory: a per-pixel recurrent state updated by the decoder every frame.
* Object memory: running sums of object summaries that seed the query transformer.

The uncertainty head blends the memory readout with the last frame's own value where
the readout looks unreliable, which is what keeps mattes stable between frames.
"""

from __future__ import annotations

import torch

from .config import MemoryConfig
from .network import MatAnyOneNet

__all__ = ["MattingEngine", "similarity", "top_k_softmax"]


def similarity(
    mem_key: torch.Tensor, shrinkage: torch.Tensor, q_key: torch.Tensor, selection: torch.Tensor
) -> torch.Tensor:
    """Negative squared distance, weighted per channel by the query's selection and scaled
    per memory token by its shrinkage. mem_key (B, CK, N), shrinkage (B, 1, N),
    q_key/selection (B, CK, HW) -> (B, N, HW)."""
    ck = mem_key.shape[1]
    mk = mem_key.transpose(1, 2)
    a_sq = mk.pow(2) @ selection
    two_ab = 2 * (mk @ (q_key * selection))
    b_sq = (selection * q_key.pow(2)).sum(1, keepdim=True)
    return (-a_sq + two_ab - b_sq) * shrinkage.transpose(1, 2) / ck**0.5


def top_k_softmax(sim: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over each column's `top_k` largest entries, zero elsewhere."""
    k = min(top_k, sim.shape[1])
    values, indices = torch.topk(sim, k=k, dim=1)
    weights = torch.softmax(values, dim=1)
    return torch.zeros_like(sim).scatter_(1, indices, weights)


class _WorkingMemory:
    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self.frames: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # k, s, v

    def add(self, key: torch.Tensor, shrinkage: torch.Tensor, value: torch.Tensor) -> None:
        self.frames.append((key.flatten(2), shrinkage.flatten(2), value.flatten(3)))
        while len(self.frames) > self.max_frames:
            del self.frames[1]  # frame 0 (the given mask) is permanent

    def replace_first(
        self, key: torch.Tensor, shrinkage: torch.Tensor, value: torch.Tensor
    ) -> None:
        self.frames[0] = (key.flatten(2), shrinkage.flatten(2), value.flatten(3))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, s, v = zip(*self.frames, strict=True)
        return torch.cat(k, -1), torch.cat(s, -1), torch.cat(v, -1)


class MattingEngine:
    """One video's state. `first(image, mask)`, then `step(image)` per frame; both take
    (3, H, W) float images in [0, 1] with H, W multiples of 16 and return (H, W) alpha."""

    def __init__(self, net: MatAnyOneNet, memory: MemoryConfig) -> None:
        self.net = net
        self.cfg = memory
        self.work = _WorkingMemory(memory.max_mem_frames)
        self.frame = 0
        self.sensory: torch.Tensor | None = None
        self.summaries: torch.Tensor | None = None
        self.last_value: torch.Tensor | None = None
        self.last_feat: torch.Tensor | None = None
        self.last_alpha: torch.Tensor | None = None

    @torch.inference_mode()
    def first(self, image: torch.Tensor, mask: torch.Tensor, warmup: int) -> torch.Tensor:
        """Remember the given mask, then refine it `warmup` times on the same frame; the
        result is frame 0's alpha (the given mask itself when warmup is 0)."""
        net = self.net
        img = image.unsqueeze(0)
        feats, pix = net.encode_image(img)
        key, shrink, _sel = net.transform_key(feats[0])
        h, w = pix.shape[-2:]
        self.sensory = torch.zeros(1, 1, net.cfg.sensory_dim, h, w, device=img.device)
        alpha = mask.view(1, 1, *mask.shape[-2:]).to(img.dtype)
        value = self._remember(img, pix, alpha)
        self.work.add(key, shrink, value)
        for _ in range(warmup):
            # the first frame has nothing to match against but itself: read its own value
            readout = net.read_out(pix, value, self.sensory, alpha, self.summaries)
            self.sensory, alpha = net.decode(feats, readout, self.sensory)
            value = self._remember(img, pix, alpha, accumulate=False)
            self.work.replace_first(key, shrink, value)
        self.last_feat, self.last_alpha, self.last_value = pix, alpha, value
        self.frame = 1
        return alpha[0, 0]

    @torch.inference_mode()
    def step(self, image: torch.Tensor) -> torch.Tensor:
        net = self.net
        assert self.last_value is not None and self.last_alpha is not None
        img = image.unsqueeze(0)
        feats, pix = net.encode_image(img)
        key, shrink, sel = net.transform_key(feats[0])
        mem_k, mem_s, mem_v = self.work.tensors()
        b, n, cv, h, w = self.last_value.shape
        affinity = top_k_softmax(
            similarity(mem_k, mem_s, key.flatten(2), sel.flatten(2)), self.cfg.top_k
        )
        visual = (mem_v.view(b, n * cv, -1) @ affinity).view(b, n, cv, h, w)
        trust = net.predict_uncertainty(
            self.last_feat, pix, self.last_alpha, visual[:, 0] - self.last_value[:, 0]
        ).unsqueeze(1)
        visual = visual * trust + self.last_value * (1 - trust)
        readout = net.read_out(pix, visual, self.sensory, self.last_alpha, self.summaries)
        self.sensory, alpha = net.decode(feats, readout, self.sensory)
        remember = self.frame % self.cfg.mem_every == 0
        value = self._remember(img, pix, alpha, accumulate=remember)
        if remember:
            self.work.add(key, shrink, value)
        self.last_feat, self.last_alpha, self.last_value = pix, alpha, value
        self.frame += 1
        return alpha[0, 0]

    def memory_tokens(self) -> int:
        return sum(k.shape[-1] for k, _s, _v in self.work.frames)

    def _remember(
        self, img: torch.Tensor, pix: torch.Tensor, alpha: torch.Tensor, accumulate: bool = True
    ) -> torch.Tensor:
        """Encode `alpha` as a mask value; update sensory memory and object sums."""
        value, self.sensory, summaries = self.net.encode_mask(img, pix, self.sensory, alpha)
        if self.summaries is None:
            self.summaries = summaries
        elif accumulate:
            self.summaries = self.summaries + summaries
        return value
