"""Whether to go to the Hugging Face Hub at all.

Offline, transformers / datasets retry each file for ~30 s before failing. One quick
socket probe decides instead: when the Hub does not answer, loads run against the local
cache only, so a cached model or dataset still loads and a missing one fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from typing import Iterator
from urllib.parse import urlparse

_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub endpoint accepts a TCP connection (HF_HUB_OFFLINE=1 means no)."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Keep datasets / huggingface_hub off the network for the duration. Both read the env
    vars at import, so the already-imported flags are switched too, and restored after."""
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    had_datasets = "datasets.config" in sys.modules
    saved_flags = (hub.HF_HUB_OFFLINE, sys.modules["datasets.config"].HF_HUB_OFFLINE if had_datasets else None)
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    hub.HF_HUB_OFFLINE = True
    if had_datasets:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hub.HF_HUB_OFFLINE = saved_flags[0]
        if "datasets.config" in sys.modules:  # imported inside: it read our "1"
            sys.modules["datasets.config"].HF_HUB_OFFLINE = (
                saved_flags[1] if had_datasets else _truthy(saved_env["HF_DATASETS_OFFLINE"] or saved_env["HF_HUB_OFFLINE"]))


@contextlib.contextmanager
def hub_access() -> Iterator[bool]:
    """Online when the Hub answers; otherwise cache-only. Yields whether the Hub answered,
    so an error can say "offline" rather than "not found"."""
    if hub_reachable():
        yield True
    else:
        with hf_offline():
            yield False


OFFLINE_HINT = "the Hugging Face Hub is unreachable (offline?) and it is not in the local cache"
