"""``serve --watch``: notice that the config file changed, however it was changed.

Editors write a new file and rename it over the old one, and Kubernetes swaps a ConfigMap by
pointing a ``..data`` symlink at a new directory: watching the file itself would miss both. So the
directories of the path and of the file it resolves to are watched (with ``watchfiles``: inotify,
FSEvents or polling), and a change counts only when the file's content differs from what was last
seen, so a touch, a swap to the same content or an unrelated file next to it reloads nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from watchfiles import awatch

__all__ = ["config_changes", "fingerprint"]

logger = logging.getLogger(__name__)


def fingerprint(path: str | os.PathLike[str]) -> str | None:
    """The digest of the file the path resolves to now (None: it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _directories(path: Path) -> set[Path]:
    return {path.absolute().parent, path.resolve().parent}


async def config_changes(
    path: str | os.PathLike[str], *, stop: anyio.Event | None = None, debounce_ms: int = 300
) -> AsyncIterator[None]:
    """Yield once each time the config file's content changes; until ``stop`` is set."""
    config = Path(path)
    seen = fingerprint(config)
    while stop is None or not stop.is_set():
        directories = _directories(config)  # a swapped symlink may resolve somewhere new
        async for _ in awatch(
            *directories, stop_event=stop, debounce=debounce_ms, recursive=False, yield_on_timeout=False
        ):
            now = fingerprint(config)
            if now is not None and now != seen:
                seen = now
                yield
            if _directories(config) != directories:
                break  # watch where it resolves now
