#!/usr/bin/env python
"""pretrain: ``python GVSLTrainer/pretrain.py --help`` (also ``gvsl pretrain`` once installed); the command
is ``gvsl.commands.pretrain``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.commands.pretrain import script  # noqa: E402

if __name__ == "__main__":
    script()
