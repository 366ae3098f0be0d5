"""Reading what register.py is given, each file checked and named in any error, before any work."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import stderr
from ..volumes import DataError, read_labels, read_mask, read_volume
from .kept import file_key, kept
from .landmarks import pair, read_landmarks
from .options import RegistrationError, RegistrationOptions
from .preparation import Prepared, linear_matrix, mask_problem, prepare


def read_itk_transform(path: str | Path) -> sitk.Transform:
    """Any 3D ITK transform file (.h5, .tfm, .txt, .mat), or a RegistrationError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"{path}: no such transform file")
    try:
        with stderr.held():  # HDF5 prints dozens of lines for a damaged file
            return sitk.ReadTransform(str(path))
    except RuntimeError as e:
        with open(path, "rb") as f:
            start = f.read(8)
        if path.suffix.lower() == ".h5" and start == b"\x89HDF\r\n\x1a\n":
            why = f"its HDF5 file is damaged or truncated ({path.stat().st_size} bytes)"
        else:
            why = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise RegistrationError(f"{path}: cannot be read as an ITK transform ({why})") from None


def read_transform(path: str | Path) -> sitk.Transform:
    """A linear 3D ITK transform file, or a RegistrationError naming the file."""
    transform = read_itk_transform(path)
    try:
        linear_matrix(transform, "it")
    except RegistrationError as e:
        raise RegistrationError(f"{path}: {e}") from None
    return transform


def read_mask_for(path: str | Path, image: sitk.Image) -> sitk.Image:
    """A mask for ``image``: any 3D file (non-zero = use) with at least one voxel inside the image."""
    mask = read_mask(path)
    problem = mask_problem(mask, image)
    if problem:
        raise DataError(f"{path}: this mask {problem}")
    return mask


def read_labels_for(path: str | Path, image: sitk.Image, image_path: str | Path) -> sitk.Image:
    """A label map for ``image``: any geometry (it is resampled in physical space), but it must lie on
    the image, or its Dice would compare unrelated places."""
    labels = read_labels(path)
    labelled = sitk.GetArrayViewFromImage(labels) > 0
    if labelled.any():
        inside = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(labels > 0, sitk.sitkUInt8), image,
                                                      sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        voxel = np.prod(image.GetSpacing()) / np.prod(labels.GetSpacing())  # labelled volume, in label voxels
        share = float(inside.sum()) * voxel / float(labelled.sum())
        if share < 0.5:
            raise DataError(f"{path}: its labels lie outside its image {image_path} (only {share:.0%} of the "
                            "labelled volume falls inside it); a label map must cover the region of its image")
    return labels


def read_inputs(args) -> dict:
    """The keyword arguments of ``register`` from register.py's arguments, but the model (``read_model``):
    nothing here imports torch."""
    fixed = kept("fixed", file_key(args.fixed), lambda: read_volume(args.fixed)) if Path(args.fixed).is_file() \
        else read_volume(args.fixed)  # (not a file: read_volume names the problem)
    moving = read_volume(args.moving)

    def of_fixed(role: str, path, read):  # the fixed image's labels and mask: kept with it
        return kept(f"fixed {role}", (file_key(path), id(fixed)), lambda: read(path), (fixed,)) \
            if Path(path).is_file() else read(path)

    inputs = dict(fixed=fixed, moving=moving,
                  fixed_labels=of_fixed("labels", args.fixed_labels, lambda p: read_labels_for(p, fixed, args.fixed))
                  if args.fixed_labels else None,
                  moving_labels=read_labels_for(args.moving_labels, moving, args.moving) if args.moving_labels
                  else None,
                  fixed_mask=of_fixed("mask", args.fixed_mask, lambda p: read_mask_for(p, fixed)) if args.fixed_mask
                  else None,
                  moving_mask=read_mask_for(args.moving_mask, moving) if args.moving_mask else None,
                  initial_transform=read_transform(args.initial_transform) if args.initial_transform else None)
    if args.fixed_landmarks:
        fixed_lm, moving_lm = read_landmarks(args.fixed_landmarks), read_landmarks(args.moving_landmarks)
        pair(fixed_lm, moving_lm)  # unequal counts or labels: an error now
        inputs.update(fixed_landmarks=fixed_lm, moving_landmarks=moving_lm)
    return inputs


def read_model(path: str | Path):
    """A GVSL checkpoint, checked to build as a GVSL network before any preprocessing."""
    from ..checkpoint import build_gvsl, load

    model = load(path)
    build_gvsl(model)
    return model


@contextlib.contextmanager
def naming_the_files(args):
    """The pipeline knows images, not files: its errors name register.py's files (the masks too, when
    the error is about them)."""
    try:
        yield
    except RegistrationError as e:
        raise named_error(args, e) from None


def named_error(args, error: RegistrationError) -> RegistrationError:
    """``error`` with register.py's files named (see ``naming_the_files``)."""
    files = [f"fixed: {args.fixed}", f"moving: {args.moving}"]
    if "mask" in str(error):
        files += [f"{role} mask: {path}" for role, path in (("fixed", getattr(args, "fixed_mask", None)),
                                                              ("moving", getattr(args, "moving_mask", None))) if path]
    return RegistrationError(f"{error} ({'; '.join(files)})")


def read_and_prepare(args, options: RegistrationOptions, model=None) -> tuple[Prepared, dict]:
    """``prepare`` on register.py's files, and the label maps ``register_prepared`` takes; no torch (but
    for a ``model`` already read)."""
    inputs = read_inputs(args)
    labels = {k: inputs.pop(k) for k in ("fixed_labels", "moving_labels")}
    with naming_the_files(args):
        return prepare(**inputs, options=options, model=model), labels
