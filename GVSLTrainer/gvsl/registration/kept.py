"""What depends only on the fixed image, kept in this process for the next registration onto it: a
cohort's worker registers every subject onto one atlas, and reads, classifies, resamples and
normalises that atlas once instead of once per subject.

Off unless a process turns it on (``keep_fixed``): anywhere else a kept atlas would only hold memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
_entries: dict[str, tuple] = {}  # name -> (key, objects kept alive, value): one entry per name
_on = False


def keep_fixed(on: bool = True) -> None:
    """Keep (or stop keeping, and forget) what ``kept`` computes, in this process."""
    global _on
    _on = on
    if not on:
        _entries.clear()


def kept(name: str, key: tuple, compute: Callable[[], T], alive: tuple = ()) -> T:
    """``compute()`` for ``key``, remembered as ``name``'s single entry while keeping is on. ``key`` may
    hold ``id()``s of ``alive``'s objects: they are kept alive with the entry, so an id cannot be
    reused meanwhile."""
    if not _on:
        return compute()
    entry = _entries.get(name)
    if entry is None or entry[0] != key:
        entry = _entries[name] = (key, alive, compute())
    return entry[2]


def file_key(path: str | Path) -> tuple:
    """A file's identity: a rewritten file is read again."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns
