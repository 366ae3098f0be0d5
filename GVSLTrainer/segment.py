#!/usr/bin/env python
"""segment: ``python GVSLTrainer/segment.py --help`` (also ``gvsl segment`` once installed); the command
is ``gvsl.commands.segment``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.commands.segment import script  # noqa: E402

if __name__ == "__main__":
    script()
