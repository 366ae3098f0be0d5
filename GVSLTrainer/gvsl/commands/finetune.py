"""Fine-tune a GVSL segmentation model on labelled volumes.

    python GVSLTrainer/finetune.py --data Task02_Heart/dataset.json --pretrained gvsl_pretrained.pt \\
        --normalize ct --output-dir runs/heart
    python GVSLTrainer/finetune.py --data cases/ --freeze-backbone --pretrained GVSL_epoch_1000.pth  # linear eval

--data is an MSD/nnU-Net dataset.json (training: [{image, label}], labels: {"0": "background", ...})
or a folder with images/ and labels/ of matching names. Label values may be any integers; the
mapping to classes is kept with the model. Writes OUTPUT/gvsl_segmentation.pt (the best model on
the validation cases), OUTPUT/checkpoint_last.pt (to --resume), OUTPUT/log.csv, OUTPUT/tensorboard/.
"""
import sys
from typing import NoReturn

from gvsl.cli import run
from gvsl.config import build_parser, resolve
from gvsl.finetune import FinetuneConfig, train


def main(argv=None) -> int:
    parser = build_parser(FinetuneConfig, __doc__)
    args = parser.parse_args(argv)
    return run(lambda: train(resolve(FinetuneConfig, args)))  # option values are checked inside: one error line


def script(argv=None) -> NoReturn:
    """Run as a command (``GVSLTrainer/finetune.py``, ``gvsl finetune``) and end the process."""
    sys.exit(main(argv))
