"""GVSL self-supervised pre-training.

    python GVSLTrainer/pretrain.py                      # a quick demo on built-in real MR volumes
    python GVSLTrainer/pretrain.py --data /scans --output-dir runs/ct --steps 3000 --width 16 --crop 64 64 64
    torchrun --nproc_per_node 4 GVSLTrainer/pretrain.py --data /scans --amp

Writes OUTPUT/gvsl_pretrained.pt (the model), OUTPUT/checkpoint_last.pt (to --resume),
OUTPUT/log.csv and OUTPUT/tensorboard/.
"""
import sys
from typing import NoReturn

from gvsl.cli import run
from gvsl.config import DEMO_OVERRIDES, PretrainConfig, build_parser, demo_text, resolve
from gvsl.pretrain import train


def main(argv=None) -> int:
    parser = build_parser(PretrainConfig, f"{__doc__}\n{demo_text()}")
    args = parser.parse_args(argv)
    return run(lambda: train(resolve(PretrainConfig, args, DEMO_OVERRIDES)))  # option values are checked inside: one error line


def script(argv=None) -> NoReturn:
    """Run as a command (``GVSLTrainer/pretrain.py``, ``gvsl pretrain``) and end the process."""
    sys.exit(main(argv))
