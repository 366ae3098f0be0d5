"""Where the module finds the headless trainer (``gvsl`` and its scripts) and its resources.

Installed by CMake, GVSLTrainer/ and Resources/ sit beside GVSL.py; in a source checkout added to
Slicer's module paths they sit one level up, at the top of the repository.
"""
from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent


def _find(name: str) -> Path:
    for base in (MODULE_DIR, MODULE_DIR.parent):
        if (base / name).exists():
            return base / name
    raise FileNotFoundError(f"{name} is neither in {MODULE_DIR} nor in {MODULE_DIR.parent}; "
                            "the GVSL module is incompletely installed")


def trainerDir() -> Path:
    """The folder holding the ``gvsl`` package and the entry scripts (register.py, segment.py)."""
    return _find("GVSLTrainer")


def chosenFile(path) -> str:
    """The file a path field holds (a model, an atlas table), or "" for none: Slicer's path connector
    and scenes saved by earlier versions hold "." for none."""
    text = str(path or "").strip()
    return "" if text in ("", ".") else text


def resourcePath(relative: str) -> Path:
    return _find("Resources") / relative


def ensureGvslImportable() -> None:
    """Put the bundled ``gvsl`` on sys.path unless one is installed (pip install -e . in a venv)."""
    try:
        import gvsl  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(trainerDir()))
