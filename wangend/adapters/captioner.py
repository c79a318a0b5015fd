"""Florence-2 captions for image-conditioned jobs, through transformers' own
`Florence2ForConditionalGeneration` (no `trust_remote_code`).

Only checkpoints in transformers' native Florence-2 layout load (the converted
"florence-community/Florence-2-base"/"-large" repos, or a folder saved by
`save_pretrained`); Microsoft's original repos need remote code and are refused. The
task is "<MORE_DETAILED_CAPTION>" with 3 beams, deterministic.

    captioner = Florence2Captioner("florence-community/Florence-2-base", device="cpu")
    captioner.caption(Path("start.png")) -> str
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TASK", "Florence2Captioner"]

TASK = "<MORE_DETAILED_CAPTION>"


class Florence2Captioner:
    def __init__(self, source: str, device: str = "cpu", max_new_tokens: int = 256) -> None:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        local = Path(source).expanduser()
        ref = str(local) if local.exists() else source
        offline = local.exists() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        self.processor = AutoProcessor.from_pretrained(ref, local_files_only=offline)
        # Read, not mapped, where the model stays on the host: a mapped file rewritten or
        # cut short later would change the model or kill the daemon (SIGBUS).
        self.model = Florence2ForConditionalGeneration.from_pretrained(
            ref,
            use_safetensors=True,
            local_files_only=offline,
            disable_mmap=not str(device).startswith("cuda"),
        )
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def caption(self, image_path: Path) -> str:
        import torch
        from PIL import Image

        with Image.open(image_path) as image:
            rgb = image.convert("RGB")
        inputs = self.processor(text=TASK, images=rgb, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=3, do_sample=False
            )
        return self._answer(ids, rgb.size)

    def _answer(self, ids, image_size: tuple[int, int]) -> str:
        """The task's answer from Florence-2's own post-processing, else the decoded text
        without special tokens. transformers raises "Unsupported parse task" when the
        processor's `post_processor_config` has no `pure_text` entry (a hand-saved folder), and
        any parse failure should cost the caption's markup, not the caption."""
        raw = self.processor.batch_decode(ids, skip_special_tokens=False)[0]
        try:
            parsed = self.processor.post_process_generation(raw, task=TASK, image_size=image_size)
        except (ValueError, KeyError, TypeError, IndexError):
            parsed = None
        answer = parsed.get(TASK) if isinstance(parsed, dict) else None
        if not isinstance(answer, str):
            answer = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
        return answer.strip()
