"""Reading and writing model files: this project's checkpoints and the official GVSL state_dicts."""
from __future__ import annotations

import datetime
import os
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .outputs import remove_stale
from .networks import GVSL

FORMAT = "gvsl-slicer"
FORMAT_VERSION = 1
KINDS = ("pretrain", "segmentation")
OFFICIAL_MARKER = "unet.inc.double_conv.0.weight"


class CheckpointError(ValueError):
    """A model file that cannot be used, always naming the file and what it is instead."""


@dataclass
class Checkpoint:
    path: Path
    kind: str  # "pretrain" | "segmentation"
    source: str  # "project" | "official"
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None  # optimizer, scaler, step, RNG: only in checkpoint_last.pt

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def norm(self) -> str:
        """The U-Net's normalisation; files without it (official, and this project's before the option)
        were trained with the paper's GroupNorm."""
        return str(self.meta.get("norm", "group"))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file beside ``path``, then rename: a kill never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.", ".tmp")  # a process killed while saving left its temporary
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def provenance() -> dict[str, str]:
    return {"gvsl_version": __version__, "torch_version": str(torch.__version__), "python": platform.python_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def save(path: str | Path, model: torch.nn.Module, kind: str, meta: dict[str, Any],
         training_state: dict[str, Any] | None = None) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": {**meta, "provenance": provenance()}}
    if training_state is not None:
        payload["training_state"] = training_state
    return atomic_save(payload, path)


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """State dicts saved from DataParallel / DDP carry a 'module.' prefix."""
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a project checkpoint or an official GVSL state_dict (``GVSL_epoch_*.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # a foreign pickle also draws torch's protocol warning: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all mean "not ours"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))  # torch colours parts of its message
        if "WeightsUnpickler error:" in text:  # the reason, not torch's advice to load it unsafely
            detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
            reason = "it holds Python objects, not only tensors, and none of them was run: " + " ".join(detail.split())
        else:
            reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that can be loaded safely "
                              f"({type(e).__name__}: {reason})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer version (format {obj['format_version']}); "
                                  f"this gvsl {__version__} reads format {FORMAT_VERSION}")
        missing = [k for k in ("kind", "state_dict") if k not in obj]
        if missing or obj["kind"] not in KINDS:
            what = f"has no {' and no '.join(repr(k) for k in missing)}" if missing else f"has kind {obj['kind']!r}"
            raise CheckpointError(f"{path}: a damaged GVSL checkpoint: it {what} (a checkpoint holds one of "
                                  f"{', '.join(KINDS)} and its weights)")
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        if obj["kind"] == "segmentation" and not isinstance(meta.get("labels"), dict):
            raise CheckpointError(f"{path}: a damaged segmentation model: it names no classes (meta 'labels')")
        return Checkpoint(path, obj["kind"], "project", obj["state_dict"], meta, obj.get("training_state"))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = _strip_prefix(obj)
        if OFFICIAL_MARKER in state:
            w = state[OFFICIAL_MARKER]
            meta = {"width": int(w.shape[0]), "in_channels": int(w.shape[1]), "normalize": "ct",
                    "note": "official GVSL weights (reference implementation)"}
            return Checkpoint(path, "pretrain", "official", state, meta)
        sample = ", ".join(list(state)[:3])
        raise CheckpointError(f"{path}: a PyTorch state_dict, but not of a GVSL model (no '{OFFICIAL_MARKER}'; "
                              f"its keys start {sample})")
    what = type(obj).__name__
    keys = f" with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) else ""
    raise CheckpointError(f"{path}: a PyTorch file holding a {what}{keys}; neither a GVSL project checkpoint "
                          "nor an official GVSL state_dict")


def build_gvsl(ckpt: Checkpoint) -> GVSL:
    """The GVSL network with the checkpoint's weights (strict: every parameter must match)."""
    if ckpt.kind != "pretrain":
        raise CheckpointError(f"{ckpt.path}: is a {ckpt.kind} model, not a GVSL pre-training/registration model")
    model = GVSL(in_channels=int(ckpt.meta.get("in_channels", 1)), width=ckpt.width, norm=ckpt.norm)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path}: weights do not fit a width-{ckpt.width} GVSL network: "
                              f"{str(e).splitlines()[0]}") from None
    return model
