"""C libraries' messages on the standard error (ITK, HDF5, MetaImage, NIfTI), held back while one file
is read or written: on success they are passed on as they came; on failure the tool's own error, which
names the file and the cause, takes their place (a full disk printed about 100 HDF5 lines and named
neither).

The standard error is one per process: holders in several threads take turns (a lock), so that none
restores another's redirection."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Iterator

_turn = threading.RLock()


@contextlib.contextmanager
def held() -> Iterator[None]:
    with _turn:
        with _held():
            yield


@contextlib.contextmanager
def _held() -> Iterator[None]:
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to redirect (a GUI process): nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                caught.seek(0)
                data = caught.read()
                if data:
                    os.write(2, data)
