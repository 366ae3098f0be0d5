#!/usr/bin/env python
"""register: ``python GVSLTrainer/register.py --help`` (also ``gvsl register`` once installed); the command
is ``gvsl.commands.register``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.commands.register import script  # noqa: E402

if __name__ == "__main__":
    script()
