"""Hub ids when the Hugging Face hub cannot be reached: one line in well under a second.

Without this, an id that is not cached costs 20-50 s of retries (transformers, datasets) before
an error. :func:`require_hub` is called where a hub id is about to be loaded: an id that is
cached, a local path, or a world model passes; otherwise, when ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE`` is set, or a TCP connection to the hub's endpoint (or the HTTPS proxy)
does not open within :data:`PROBE_SECONDS`, it raises a :class:`UserError` that says how to point
at a local folder or file instead.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from alignloop.errors import UserError

PROBE_SECONDS = 0.5
_TRUE = ("1", "true", "yes", "on")


def require_hub(name: str, kind: str = "model") -> None:
    """Fail fast when ``name`` (a hub ``kind``: "model" or "dataset") would need the unreachable hub."""
    if name.startswith(("world:", "http://", "https://")) or _is_path(name) or is_cached(name, kind):
        return
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in _TRUE]
    if offline:
        why = f"{offline[0]} is set"
    elif not hub_reachable():
        why = f"{_endpoint()[0]} cannot be reached"
    else:
        return
    if kind == "dataset":
        fix = "pass a local JSONL/CSV/Parquet file instead (or download it where there is network)"
    else:
        fix = (
            "pass a local HF model folder instead (save_pretrained / `huggingface-cli download` it elsewhere)"
        )
    raise UserError(f"{kind} {name!r} is not in the local cache and {why}", fix=fix)


def _is_path(name: str) -> bool:
    """A local path (existing, or written as one: ``./x``, ``/x``, ``a/b/c``, ``runs/x`` when
    ``runs/`` exists), not a hub id (``gpt2``, ``owner/name``)."""
    p = Path(name)
    return p.exists() or name.startswith((".", "/", "~")) or len(p.parts) > 2 or Path(p.parts[0]).is_dir()


def is_cached(name: str, kind: str = "model") -> bool:
    """Whether the hub cache holds a snapshot of ``name`` (``datasets`` keeps its own cache too)."""
    repo = name.split(":", 1)[0]  # "owner/name:label" reward specs, "name:config" datasets
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    folder = f"{kind}s--{repo.replace('/', '--')}"
    if (Path(constants.HF_HUB_CACHE) / folder / "snapshots").is_dir():
        return True
    if kind == "dataset":
        home = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"
        return any(Path(home).glob(f"{repo.replace('/', '___')}*"))
    return False


def _endpoint() -> tuple[str, int]:
    """The host and port a hub request would open first: the HTTPS proxy, else the endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def hub_reachable() -> bool:
    """A TCP connection to the hub (or proxy) opens within :data:`PROBE_SECONDS` (name lookup
    included: it runs in a thread that is abandoned when it takes longer)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(_endpoint(), timeout=PROBE_SECONDS):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(PROBE_SECONDS)
    return bool(ok)
