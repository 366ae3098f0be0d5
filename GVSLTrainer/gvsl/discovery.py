"""Finding images: a folder searched recursively, a list file, or an MSD-style dataset.json.

No torch here: a cohort's client lists its subjects without importing it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .volumes import IMAGE_SUFFIXES, DataError


def is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def discover(source: str | Path) -> list[Path]:
    """Image paths from a folder (recursive), a text file of paths, or an MSD-style ``dataset.json``."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if is_image(p))
        kind = "folder"
    elif source.suffix.lower() == ".json":
        paths, kind = _from_dataset_json(source), "dataset.json"
    elif is_image(source):
        paths, kind = [source], "image"
    else:
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        paths = [resolve(source.parent, ln) for ln in lines if ln and not ln.startswith("#")]
        kind = "list file"
    if not paths:
        raise DataError(f"{source}: this {kind} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{source}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    return paths


def resolve(base: Path, entry: str) -> Path:
    """``entry`` (a path as a list file or table writes it) relative to ``base`` unless absolute."""
    p = Path(entry).expanduser()
    return p if p.is_absolute() else (base / p)


def _from_dataset_json(path: Path) -> list[Path]:
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a dataset.json must be an object with a 'training' list, not a "
                        f"{type(spec).__name__}")
    entries = []
    for key in ("training", "validation", "test", "images"):
        for item in spec.get(key, []) if isinstance(spec, dict) else []:
            entries.append(item["image"] if isinstance(item, dict) else item)
    return [resolve(path.parent, e) for e in entries]
