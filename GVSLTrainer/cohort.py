#!/usr/bin/env python
"""cohort: ``python GVSLTrainer/cohort.py --help`` (also ``gvsl cohort`` once installed); the command
is ``gvsl.commands.cohort``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.commands.cohort import script  # noqa: E402

if __name__ == "__main__":
    script()
