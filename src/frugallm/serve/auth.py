"""API keys: every ``/v1`` route wants ``Authorization: Bearer KEY`` when the server has keys; ``/health``,
``/metrics`` and the tokenizer routes stay open (vLLM guards ``/v1`` alone). Keys are compared in constant
time (``hmac.compare_digest`` against every key, so the time does not tell which one nearly matched) and are
never logged.

Keys come from ``--api-key KEY`` (repeatable), ``--api-key-file PATH`` (one key a line, ``#`` comments) and
the ``FRUGALLM_API_KEY`` environment variable.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError

ENV_VAR = "FRUGALLM_API_KEY"


def load_keys(keys: Iterable[str] = (), key_file: str | None = None, env: dict[str, str] | None = None
              ) -> list[str]:
    out = [k for k in keys if k]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ConfigError(f"--api-key-file {key_file}: no such file")
        out += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    value = (os.environ if env is None else env).get(ENV_VAR)
    if value:
        out.append(value.strip())
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_warning(host: str, keys: list[str]) -> str | None:
    """The warning ``serve`` logs when it listens beyond this machine with no key (None: nothing to say)."""
    if keys or is_loopback(host):
        return None
    return (f"listening on {host} without an API key: anyone who can reach it can use it "
            f"(pass --api-key, --api-key-file or set {ENV_VAR})")


def key_matches(given: str, keys: list[str]) -> bool:
    ok = False
    for k in keys:  # all of them, always: no early exit
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


class APIKeyAuth:
    """Pure ASGI middleware (streaming responses stay untouched): 401 in OpenAI's error JSON."""

    def __init__(self, app: Any, keys: list[str], prefix: str = "/v1") -> None:
        self.app, self.keys, self.prefix = app, list(keys), prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send Authorization: Bearer KEY" if not header
                   else "invalid API key")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
