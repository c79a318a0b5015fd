"""PromptEnhancerBridge: turns a short prompt into the long scene description Wan follows
best, and never lets that step fail a job.

Providers (`[enhancer] provider`):
  none    nothing is rewritten.
  local   a transformers causal LM with a chat template (`local_model`: hub id or
          folder; safetensors only, so no pickle is ever loaded). Decoding is greedy, so
          the same prompt gives the same result; with `sample=True` it samples from a
          torch RNG seeded with the job's seed (forked, so the process RNG is untouched).
          For image-conditioned jobs an optional Florence-2 captioner (`captioner_model`)
          describes the start image first (see captioner.py).
  remote  an OpenAI-compatible `POST {remote_url}/chat/completions`, stdlib urllib only;
          API key from the `api_key_env` variable or `api_key_file`; `timeout` per try;
          `retries` more tries on a timeout, a refused connection, HTTP 429 or 5xx, with
          exponential backoff. A 4xx or a reply that is not the expected JSON is not
          retried (asking again gives the same answer).

Any failure (model missing, load error, out of memory, HTTP error, empty reply) gives an
EnhanceResult with `ok=False`, `reason` saying why, and the original prompt; nothing is
raised into the job.

Models stay loaded between jobs and are freed after `idle_unload` seconds unused (0
keeps them). There is no background thread: `maybe_unload()` runs at the start of every
`prime`/`enhance`, and the worker may call it when idle.

How to call it (worker thread; the daemon builds one bridge from config.enhancer):

    bridge = PromptEnhancerBridge(config.enhancer, device=production.device)
    if bridge.wants(spec):                          # spec.enhance_prompt, else by_default
        bridge.prime(spec)                          # loads the local model if needed
        [result] = bridge.enhance([job.prompt], EnhanceContext(
            family=job.family, image=job.image, seed=job.seed))
        prompt = result.prompt                      # the original when result.ok is False
        job = replace(job, prompt=prompt, original_prompt=result.original,
                      enhancer=result.record())
    bridge.maybe_unload()                           # when the queue is idle
    bridge.reset()                                  # at shutdown or on memory pressure
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from msgspec import Struct

from ..config import EnhancerConfig
from .captioner import Florence2Captioner
from .remote_chat import RemoteChat, RemoteChatError
from .system_prompts import system_prompt_for, user_message

__all__ = ["EnhanceContext", "EnhanceResult", "LocalChatModel", "PromptEnhancerBridge"]


class EnhanceContext(Struct, frozen=True, kw_only=True):
    family: str = ""  # "wan2.1-i2v" etc.; an "i2v" family counts as image-conditioned
    image: str | None = None  # start image of an image-conditioned job
    seed: int | None = None  # used only when sampling

    @property
    def image_conditioned(self) -> bool:
        return self.image is not None or "i2v" in self.family


class EnhanceResult(Struct, frozen=True, kw_only=True):
    prompt: str  # what the model gets: the enhanced prompt, or the original on failure
    original: str
    provider: str
    model: str
    ok: bool
    reason: str | None = None
    caption: str | None = None  # the start image's description, when one was made

    def record(self) -> dict[str, Any]:
        """What ResolvedGenerate.enhancer keeps."""
        out: dict[str, Any] = {"provider": self.provider, "model": self.model, "ok": self.ok}
        if self.reason:
            out["reason"] = self.reason
        if self.caption:
            out["caption"] = self.caption
        return out


def _short(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else ""
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def clean_reply(text: str) -> str:
    """The model's reply as a prompt: trimmed, without wrapping quotes or a label."""
    text = text.strip()
    for label in ("Prompt:", "Enhanced prompt:", "Rewritten prompt:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label) :].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


class LocalChatModel:
    """A causal LM and its tokenizer, loaded once; `chat` answers one system+user turn."""

    def __init__(self, source: str, device: str = "cpu", max_new_tokens: int = 256) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(source).expanduser()
        ref = str(local) if local.exists() else source
        offline = local.exists() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        self.tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=offline)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{source} has no chat template")
        # Read, not mapped, where the model stays on the host: a mapped file rewritten or
        # cut short later would change the model or kill the daemon (SIGBUS).
        self.model = AutoModelForCausalLM.from_pretrained(
            ref,
            use_safetensors=True,
            local_files_only=offline,
            disable_mmap=not str(device).startswith("cuda"),
        )
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def chat(self, system: str, user: str, seed: int | None = None, sample: bool = False) -> str:
        import torch

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed if seed is not None else 0)
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=sample,
                pad_token_id=pad,
                **({"temperature": 0.7, "top_p": 0.9} if sample else {}),
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)


class PromptEnhancerBridge:
    """Owns the enhancer's models and the remote client. Worker thread only."""

    def __init__(
        self,
        config: EnhancerConfig,
        *,
        device: str = "cpu",
        sample: bool = False,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
        backoff: float = 0.5,
    ) -> None:
        self.config = config
        self.device = device
        self.sample = sample
        self._clock = clock
        self._environ = os.environ if environ is None else environ
        self._backoff = backoff
        self._llm: LocalChatModel | None = None
        self._captioner: Florence2Captioner | None = None
        self._load_error: str | None = None
        self._last_used = clock()
        self.loads = 0  # how many times a local model was built (diagnostics, tests)

    # --- public ------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._llm is not None or self._captioner is not None

    @property
    def model_name(self) -> str:
        if self.config.provider == "local":
            return self.config.local_model
        if self.config.provider == "remote":
            return self.config.remote_model
        return ""

    def wants(self, spec: Any) -> bool:
        """Whether a job asks for enhancing: its own `enhance_prompt`, else the default."""
        if self.config.provider == "none":
            return False
        asked = getattr(spec, "enhance_prompt", None)
        return bool(self.config.by_default if asked is None else asked)

    def prime(self, spec: Any) -> None:
        """Load the local model ahead of a job that wants it (a failure is remembered and
        reported by `enhance`, not raised)."""
        self.maybe_unload()
        if self.config.provider == "local" and self.wants(spec):
            self._ensure_local()

    def enhance(self, prompts: list[str], context: EnhanceContext) -> list[EnhanceResult]:
        self.maybe_unload()
        results = [self._enhance_one(prompt, context) for prompt in prompts]
        self._last_used = self._clock()
        return results

    def maybe_unload(self, now: float | None = None) -> bool:
        """Free the local models when unused for `idle_unload` seconds; True if it did."""
        if not self.loaded or self.config.idle_unload <= 0:
            return False
        now = self._clock() if now is None else now
        if now - self._last_used < self.config.idle_unload:
            return False
        self.reset()
        return True

    def reset(self) -> None:
        """Drop the models (and a remembered load failure, so the next job tries again)."""
        self._llm = self._captioner = None
        self._load_error = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass

    # --- internals -------------------------------------------------------------------------------

    def _result(self, prompt: str, ok: bool, text: str | None = None, **kw: Any) -> EnhanceResult:
        return EnhanceResult(
            prompt=text if ok and text else prompt,
            original=prompt,
            provider=self.config.provider,
            model=self.model_name,
            ok=ok,
            **kw,
        )

    def _ensure_local(self) -> LocalChatModel | None:
        if self._llm is not None or self._load_error is not None:
            return self._llm
        if not self.config.local_model:
            self._load_error = "no local_model is configured"
            return None
        try:
            self._llm = LocalChatModel(
                self.config.local_model, self.device, self.config.max_new_tokens
            )
            self.loads += 1
        except Exception as exc:
            self._load_error = f"could not load {self.config.local_model}: {_short(exc)}"
        self._last_used = self._clock()
        return self._llm

    def _caption(self, context: EnhanceContext) -> tuple[str | None, str | None]:
        """(caption, problem): a missing captioner is not a problem, a failing one is."""
        if not context.image or not self.config.captioner_model:
            return None, None
        try:
            if self._captioner is None:
                self._captioner = Florence2Captioner(self.config.captioner_model, self.device)
            return self._captioner.caption(Path(context.image)), None
        except Exception as exc:
            return None, f"captioner failed: {_short(exc)}"

    def _enhance_one(self, prompt: str, context: EnhanceContext) -> EnhanceResult:
        provider = self.config.provider
        if provider == "none":
            return self._result(prompt, False, reason="the prompt enhancer is off")
        caption, problem = self._caption(context)
        system = system_prompt_for(context.image_conditioned)
        user = user_message(prompt, caption)
        try:
            if provider == "local":
                llm = self._ensure_local()
                if llm is None:
                    return self._result(prompt, False, reason=self._load_error, caption=caption)
                reply = llm.chat(system, user, seed=context.seed, sample=self.sample)
            else:
                reply = self._remote().complete(system, user, seed=context.seed)
        except RemoteChatError as exc:
            return self._result(prompt, False, reason=str(exc), caption=caption)
        except Exception as exc:
            return self._result(prompt, False, reason=f"generation failed: {_short(exc)}")
        text = clean_reply(reply)
        if not text:
            return self._result(
                prompt, False, reason="the model replied with nothing", caption=caption
            )
        return self._result(prompt, True, text, reason=problem, caption=caption)

    def _remote(self) -> RemoteChat:
        return RemoteChat(
            base_url=self.config.remote_url,
            model=self.config.remote_model,
            api_key=self._api_key(),
            timeout=self.config.timeout,
            retries=self.config.retries,
            max_tokens=self.config.max_new_tokens,
            backoff=self._backoff,
            temperature=0.7 if self.sample else 0.0,
        )

    def _api_key(self) -> str | None:
        if self.config.api_key_env and self._environ.get(self.config.api_key_env):
            return self._environ[self.config.api_key_env].strip()
        if self.config.api_key_file:
            try:
                return Path(self.config.api_key_file).expanduser().read_text().strip() or None
            except OSError:
                return None
        return None
