"""Training options: defaults, a YAML file, then command-line overrides, in that order."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .choices import DEVICES, NORMS


@dataclass
class TrainConfig:
    """Options common to pre-training and fine-tuning. Field docs become ``--help``."""
    data: str | None = field(default=None, metadata={"help": "a folder (searched recursively), a text file "
                             "listing image paths, or an MSD-style dataset.json; omitted: the built-in demo set"})
    output_dir: str = field(default="gvsl_runs/pretrain", metadata={"help": "where checkpoints and logs go"})
    steps: int = field(default=200_000, metadata={"help": "optimisation steps in total (the paper: 200000)"})
    batch_size: int = field(default=2, metadata={"help": "pairs per step and per process"})
    crop: tuple[int, int, int] = field(default=(128, 128, 128), metadata={"help": "crop size D H W in voxels"})
    width: int = field(default=32, metadata={"help": "channels of the first U-Net level (32 in the paper; "
                                                   "8 gives a tiny model)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    device: str = field(default="auto", metadata={"help": "auto picks cuda, then mps, then cpu",
                                                  "choices": DEVICES})
    amp: bool = field(default=False, metadata={"help": "mixed precision on CUDA: bf16 where supported, "
                                                      "else fp16 with a gradient scaler"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT/checkpoint_last.pt"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh in an OUTPUT that holds an earlier run, replacing its checkpoints and logs "
                "(without it or --resume, such an OUTPUT is refused)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the crops and the augmentations"})
    normalize: str | None = field(default=None, metadata={
        "help": "intensity preset: auto = each image its own (ct where it holds Hounsfield units, air near "
                "-1000, else mr); ct = Hounsfield [-1024, 1024] to [0, 1]; mr = 0.5-99.5 percentiles to [0, 1]. "
                "The checkpoint records the preset and what auto chose", "choices": ("auto", "ct", "mr"),
        "default_text": "auto; when fine-tuning a pre-trained backbone, its preset"})
    spacing: tuple[float, float, float] = field(default=(1.5, 1.5, 1.5), metadata={
        "help": "voxel spacing in mm that every volume is resampled to (1 or 3 values)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoint_last.pt writes"})
    log_every: int = field(default=10, metadata={"help": "steps between CSV/TensorBoard rows"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "cache of preprocessed volumes (default OUTPUT/cache)"})
    channels_last: bool | None = field(default=None, metadata={
        "help": "channels-last-3d memory format: 25-40%% faster conv3d on a CPU; on an H100 it made "
                "steps 18%% slower in float32 and 1.2x slower with --amp", "default_text": "CPU only"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class PretrainConfig(TrainConfig):
    ncc_weight: float = field(default=1.0, metadata={"help": "weight of the local NCC matching loss"})
    smooth_weight: float = field(default=1.0, metadata={"help": "weight of the displacement smoothness loss"})
    mse_weight: float = field(default=1.0, metadata={"help": "weight of the restoration MSE loss"})
    ncc_window: int = field(default=9, metadata={"help": "local NCC window, voxels"})
    norm: str = field(default="group", metadata={
        "help": "the U-Net's normalisation: group (the paper's GroupNorm, channels/8 per group, as official "
                "checkpoints) or instance (each channel alone; needs crops over 16 voxels along an axis)",
        "choices": NORMS})


# What a newcomer's first run without --data uses: a few quick steps on the CPU.
DEMO_OVERRIDES = {"steps": 30, "crop": (48, 48, 48), "width": 8, "batch_size": 2, "normalize": "mr",
                  "checkpoint_every": 10, "output_dir": "gvsl_runs/demo_pretrain"}


def demo_text() -> str:
    """What ``--help`` says the no-argument run does."""
    d = DEMO_OVERRIDES
    return (f"Without --data, a demo: the built-in real MR volumes, {d['steps']} steps at width {d['width']} on "
            f"{'x'.join(map(str, d['crop']))} crops (a minute on a CPU), into {d['output_dir']}. With --data, "
            "the paper's settings (200000 steps, width 32, 128^3 crops): a GPU's job; the run estimates its "
            "time after its first steps.")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Options that make no sense at zero (or below zero): refused by name instead of failing later.
POSITIVE = ("steps", "batch_size", "width", "lr", "checkpoint_every", "log_every", "val_every", "ncc_window")
NON_NEGATIVE = ("workers", "warmup_steps", "seed", "ncc_weight", "smooth_weight", "mse_weight")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    if value is None:
        return None
    flag = "--" + f.name.replace("_", "-")
    if f.name in POSITIVE and not value > 0:
        raise ValueError(f"{flag} must be above 0, got {value}")
    if f.name in NON_NEGATIVE and not value >= 0:
        raise ValueError(f"{flag} must be 0 or more, got {value}")
    if f.name == "spacing":
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"{flag} needs 1 or 3 positive values, got {value}")
        return tuple(values)
    if f.name == "crop":
        values = [int(v) for v in value]
        if len(values) != 3 or min(values) < 8:
            raise ValueError(f"{flag} needs 3 sizes of at least 8 voxels, got {value}")
        return tuple(values)
    if f.name.endswith(("_rate", "_fraction")) and not 0 <= float(value) <= 1:
        raise ValueError(f"{flag} is a share between 0 and 1, got {value}")
    return value


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of options (command-line flags override it)")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool, "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {f.metadata.get('default_text', f.default)})")
        elif f.name in ("crop", "spacing"):
            kind = int if f.name == "crop" else float
            parser.add_argument(flag, type=kind, nargs="+" if f.name == "spacing" else 3, default=None,
                                metavar=("D", "H", "W") if f.name == "crop" else "MM",
                                help=f"{help_text} (default: {' '.join(map(str, f.default))})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"),
                                help=f"{help_text} (default: {f.metadata.get('default_text', f.default)})")
    return parser


def resolve(cls: type, args: argparse.Namespace, demo_overrides: dict[str, Any] | None = None) -> Any:
    """defaults < demo overrides (when no data is given) < YAML < command line."""
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        unknown = set(loaded) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown options {sorted(unknown)}")
        values.update(loaded)
    cli = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    values.update(cli)
    if values.get("data") is None and demo_overrides:
        values = {**demo_overrides, **values}
    by_name = {f.name: f for f in fields(cls)}
    return cls(**{k: _coerce(by_name[k], v) for k, v in values.items()})
