#!/usr/bin/env python
"""apply_transform: ``python GVSLTrainer/apply_transform.py --help`` (also ``gvsl apply`` once
installed); the command is ``gvsl.commands.apply_transform``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.commands.apply_transform import script  # noqa: E402

if __name__ == "__main__":
    script()
