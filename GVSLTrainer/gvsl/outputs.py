"""Output folders that appear complete or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_files(output_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``output_dir``; on success its files move into ``output_dir``.

    On any error the temporary folder is removed and ``output_dir`` is left as it was.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield stage
        output_dir.mkdir(exist_ok=True)
        for item in stage.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_image(image, path: str | Path) -> Path:
    """sitk.WriteImage to a temporary name with the same extension, then rename into place."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = "".join(s for s in path.suffixes if s.lower() in (".nii", ".gz", ".nrrd", ".mha", ".mhd", ".seg")) \
        or path.suffix
    tmp = path.with_name(f".{name[:len(name) - len(suffix)] or 'image'}.{os.getpid()}.partial{suffix}")
    try:
        sitk.WriteImage(image, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(text: str, path: str | Path) -> Path:
    """A small text file written whole or not at all (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
