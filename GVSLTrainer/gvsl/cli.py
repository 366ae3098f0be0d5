"""What every entry script shares: known errors become one clear line and a non-zero exit code."""
from __future__ import annotations

import sys
import warnings
from typing import Callable

# ValueError covers gvsl's own DataError, CheckpointError and RegistrationError; nothing here imports
# torch, so an entry script can start work before paying for it
EXPECTED = (ValueError, FileNotFoundError, RuntimeError)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run(job: Callable[[], object]) -> int:
    """Run ``job``; expected failures print ``error: ...`` instead of a traceback."""
    warnings.formatwarning = _warning_line
    try:
        job()
    except KeyboardInterrupt:
        return 130
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
