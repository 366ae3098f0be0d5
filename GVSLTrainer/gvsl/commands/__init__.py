"""The command-line tools, one module each, and ``gvsl``, the command that runs any of them:
``gvsl register ...`` is ``python GVSLTrainer/register.py ...``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name: (module, what it does)
    "register": ("register", "register a moving image onto a fixed one (rigid, affine, deformable)"),
    "apply": ("apply_transform", "apply a saved transform to images, label maps, segmentations or points"),
    "segment": ("segment", "segment an image with a fine-tuned model"),
    "finetune": ("finetune", "fine-tune a segmentation model on labelled images"),
    "pretrain": ("pretrain", "GVSL self-supervised pre-training on unlabelled images"),
    "cohort": ("cohort", "register or segment a whole cohort on Dask workers"),
}


def usage() -> str:
    from .. import __version__

    width = max(map(len, COMMANDS))
    lines = ["usage: gvsl COMMAND [options]   (gvsl COMMAND --help for its options)", "",
             f"GVSL {__version__}: registration and segmentation of 3D medical images.", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``gvsl COMMAND ...``: the command's own parser and exit code; only its module is imported."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from .. import __version__

        print(f"gvsl {__version__}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\ngvsl: error: unknown command {argv[0]!r}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"{__name__}.{COMMANDS[argv[0]][0]}")
    sys.argv[0] = f"gvsl {argv[0]}"  # what its --help and errors call it
    module.script(argv[1:])
