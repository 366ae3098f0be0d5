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
