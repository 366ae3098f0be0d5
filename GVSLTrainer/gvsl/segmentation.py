"""Segmenting a volume with a fine-tuned GVSL model, back in the input's exact geometry."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import checkpoint
from .checkpoint import Checkpoint, CheckpointError
from .data import Preprocessing
from .labels import LabelSpec
from .networks import GVSLSegmenter
from .runtime import autocast_dtype, resolve_device

FLIPS = ((), (2,), (3,), (4,))  # test-time augmentation: none, then each axis
Progress = Callable[[str, float], None]  # (stage, fraction done), as in gvsl.registration


@dataclass
class SegmentationOptions:
    device: str = "auto"
    overlap: float = 0.5  # of the sliding windows
    sw_batch_size: int = 2  # windows per forward pass
    tta: bool = False  # average over flips
    probabilities: bool = False  # also return one probability image per class
    amp: bool = False  # bf16 (or fp16) autocast for the network on a GPU; the blending stays float32


@dataclass
class SegmentationResult:
    labels: sitk.Image  # the input's geometry, the dataset's original label values
    spec: LabelSpec
    probabilities: list[sitk.Image] | None = None
    device: str = "cpu"  # where the network ran


def build_segmenter(ckpt: Checkpoint) -> tuple[GVSLSegmenter, LabelSpec]:
    if ckpt.kind != "segmentation":
        raise CheckpointError(f"{ckpt.path}: is a {ckpt.kind} model; segmentation needs a fine-tuned model "
                              "(gvsl_segmentation.pt from finetune.py)")
    spec = LabelSpec.from_dict(ckpt.meta["labels"])
    model = GVSLSegmenter(spec.num_classes, int(ckpt.meta.get("in_channels", 1)), ckpt.width, ckpt.norm)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the model they describe: "
                              f"{str(e).splitlines()[0]}") from None
    return model, spec


def load_segmenter(path: str | Path) -> tuple[Checkpoint, GVSLSegmenter, LabelSpec]:
    """(checkpoint, model, classes) of a fine-tuned model file, read and built once per process and
    version of the file: a cohort's worker segments subject after subject with one model."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        checkpoint.load(path)  # its error, naming the file as given
    stat = resolved.stat()
    return _load_segmenter(str(resolved), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_segmenter(path: str, mtime_ns: int, size: int) -> tuple[Checkpoint, GVSLSegmenter, LabelSpec]:
    ckpt = checkpoint.load(path)
    return (ckpt, *build_segmenter(ckpt))


def window_count(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> int:
    """Windows of one sliding-window sweep (MONAI's scan: a step of window * (1 - overlap))."""
    n = 1
    for size, w in zip(shape, window):
        step = max(int(w * (1 - overlap)), 1)
        n *= 1 if size <= w else math.ceil((size - w) / step) + 1
    return n


def window_batches(shape: tuple[int, ...], window: tuple[int, ...], options: SegmentationOptions) -> int:
    """Forward passes of one sweep."""
    return math.ceil(window_count(shape, window, options.overlap) / options.sw_batch_size)


def sliding_window_probabilities(model: torch.nn.Module, volume: torch.Tensor, window: tuple[int, ...],
                                 options: SegmentationOptions, device: torch.device,
                                 progress: bool | Progress = False) -> torch.Tensor:
    """(1, C, D, H, W) softmax probabilities, Gaussian-blended windows, accumulated on the CPU.
    ``progress``: True for a progress bar, or a callback."""
    from monai.inferers import sliding_window_inference

    flips = FLIPS if options.tta else FLIPS[:1]
    passes = [0, window_batches(tuple(volume.shape[2:]), window, options) * len(flips)]

    amp_dtype = autocast_dtype(device)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=options.amp):
            logits = model(x)
        out = torch.softmax(logits.float(), dim=1)
        if callable(progress):
            passes[0] += 1
            progress("segmenting", min(passes[0] / passes[1], 1.0))
        return out

    total = None
    with torch.no_grad():
        for dims in flips:
            x = volume.flip(dims) if dims else volume
            p = sliding_window_inference(x, window, options.sw_batch_size, predictor, overlap=options.overlap,
                                         mode="gaussian", sw_device=device, device="cpu", progress=progress is True)
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
    return total / len(flips)


def segment(image: sitk.Image, ckpt: Checkpoint, options: SegmentationOptions | None = None,
            progress: bool | Progress = False, built: tuple[GVSLSegmenter, LabelSpec] | None = None
            ) -> SegmentationResult:
    """Label map (and optionally probabilities) of ``image`` on its own grid; ``built``: ``ckpt``'s model
    and classes, when the caller has them (``load_segmenter``)."""
    options = options or SegmentationOptions()
    device = resolve_device(options.device)
    model, spec = built or build_segmenter(ckpt)
    model = model.to(device).eval()
    prep = Preprocessing(tuple(ckpt.meta["spacing"]), ckpt.meta["normalize"])
    grid, volume = prep.prepare(image)
    window = tuple(int(c) for c in ckpt.meta["crop"])
    probs = sliding_window_probabilities(model, volume[None, None], window, options, device, progress)[0]
    return SegmentationResult(*_to_input_grid(probs.numpy(), grid, image, spec, options.probabilities), str(device))


def keep_largest_components(labels: sitk.Image, values) -> tuple[sitk.Image, dict[int, int]]:
    """Each class's largest connected piece (face, edge or corner neighbours), its stray pieces set to
    the background, as nnU-Net's post-processing does; also how many pieces each value lost."""
    array = sitk.GetArrayFromImage(labels)
    removed = {}
    for value in values:
        if not value or not (array == value).any():
            continue
        mask = sitk.GetImageFromArray((array == value).astype(np.uint8))
        pieces = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask, True)))
        removed[int(value)] = int(pieces.max()) - 1
        array[pieces > 1] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out, removed


def _to_input_grid(probs: np.ndarray, grid: sitk.Image, reference: sitk.Image, spec: LabelSpec,
                   keep: bool) -> tuple[sitk.Image, LabelSpec, list[sitk.Image] | None]:
    """Resample each class probability linearly onto the input grid, keeping a running arg-max
    (memory: two input-sized arrays, whatever the number of classes)."""
    best = None
    best_p = None
    kept = [] if keep else None
    for c in range(probs.shape[0]):
        p = sitk.GetImageFromArray(probs[c].astype(np.float32))
        p.CopyInformation(grid)
        on_input = sitk.Resample(p, reference, sitk.Transform(), sitk.sitkLinear, 1.0 if c == 0 else 0.0,
                                 sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(on_input)
        if best is None:
            best, best_p = np.zeros(arr.shape, np.int64), arr
        else:
            better = arr > best_p
            best[better] = c
            best_p = np.where(better, arr, best_p)
        if keep:
            kept.append(on_input)
    labels = sitk.GetImageFromArray(spec.to_values(best))
    labels.CopyInformation(reference)
    return labels, spec, kept
