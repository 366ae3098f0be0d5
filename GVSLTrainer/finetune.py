#!/usr/bin/env python
"""finetune: ``python GVSLTrainer/finetune.py --help`` (also ``gvsl finetune`` once installed); the command
is ``gvsl.commands.finetune``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from gvsl.commands.finetune import script  # noqa: E402

if __name__ == "__main__":
    script()
