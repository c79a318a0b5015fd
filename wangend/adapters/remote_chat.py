"""A minimal OpenAI-compatible chat client on the standard library (urllib).

The enhancer needs one request shape, so a dependency is not worth it: `POST
{base_url}/chat/completions` with a system and a user message, read
`choices[0].message.content`. Every failure becomes RemoteChatError with one sentence
that never includes the API key.

    chat = RemoteChat(base_url="http://127.0.0.1:8000/v1", model="m", api_key=None,
                      timeout=60, retries=2)
    text = chat.complete(system, user, seed=42)   # raises RemoteChatError
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["RemoteChat", "RemoteChatError"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_REPLY_BYTES = 4 * 1024 * 1024


class RemoteChatError(Exception):
    """The remote enhancer gave no usable answer; the message says why."""


class RemoteChat:
    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout: float,
        retries: int,
        max_tokens: int = 256,
        backoff: float = 0.5,
        temperature: float = 0.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.max_tokens = max_tokens
        self.backoff = backoff
        self.temperature = temperature

    def complete(self, system: str, user: str, seed: int | None = None) -> str:
        if not self.url.startswith(("http://", "https://")):
            raise RemoteChatError(f"remote_url {self.url!r} is not an http(s) URL")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if seed is not None:
            body["seed"] = seed
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read(MAX_REPLY_BYTES + 1)
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} from {self.url}"
                if exc.code in RETRY_STATUS:
                    continue
                raise RemoteChatError(problem) from None
            except TimeoutError:
                problem = f"no answer from {self.url} within {self.timeout:g} s"
                continue
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    problem = f"no answer from {self.url} within {self.timeout:g} s"
                else:
                    problem = f"cannot reach {self.url}: {reason}"
                continue
            return self._content(raw)
        tries = self.retries + 1
        raise RemoteChatError(f"{problem} (after {tries} {'try' if tries == 1 else 'tries'})")

    def _content(self, raw: bytes) -> str:
        if len(raw) > MAX_REPLY_BYTES:
            raise RemoteChatError(f"the reply from {self.url} is larger than 4 MiB")
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteChatError(f"the reply from {self.url} is not a chat completion") from None
        if not isinstance(content, str):
            raise RemoteChatError(f"the reply from {self.url} has no text content")
        return content
