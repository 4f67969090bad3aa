"""The Lua scripts of the shared state, one concern a file; ``lua_script`` joins them into one."""

from __future__ import annotations

from importlib import resources

__all__ = ["lua_script"]


def lua_script(*names: str) -> str:
    """The files ``names`` (without ``.lua``), in order, as one script's source."""
    folder = resources.files(__name__)
    return "\n".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)
