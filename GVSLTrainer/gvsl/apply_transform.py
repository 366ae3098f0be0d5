"""A saved registration applied to other data: images, label maps, Slicer segmentations and points.

A registration's ``transform.h5`` maps fixed points to moving points: ITK's resampling direction, so
moving-space images and label maps are resampled onto the fixed grid through it as it is, while
moving-space points reach the fixed image through ``inverse.h5``. ``load_transforms`` keeps the two
together, and each kind of data takes the one it needs: the direction cannot be mixed up.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .registration.inputs import read_itk_transform
from .registration.landmarks import Landmarks
from .registration.options import RegistrationError
from .registration_io import FILES
from .slicer_segmentation import carry_segments, is_segmentation_file

KINDS = ("auto", "image", "labels", "points")
POINT_SUFFIXES = (".json", ".fcsv", ".csv", ".txt")
INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor,
                  "label": sitk.sitkLabelGaussian}
MOST_LABELS = 64  # an integer image with at most this many values is taken for a label map


@dataclass
class Transforms:
    resampling: sitk.Transform  # output-space point -> input-space point: what resampling an image uses
    points: sitk.Transform | None  # input-space point -> output-space point: what moves a point
    source: str

    def inverted(self) -> Transforms:
        """The other direction (fixed-space data onto the moving image)."""
        if self.points is None:
            raise RegistrationError(f"{self.source}: cannot be inverted: a displacement field needs its inverse "
                                    f"file; give the registration's folder, or its {FILES['inverse']}")
        return Transforms(self.points, self.resampling, self.source)


def load_transforms(path: str | Path) -> Transforms:
    """A registration's folder (register.py's ``--output-dir``), one of its transform files with its
    companion beside it, or any ITK transform file in the resampling direction (output -> input space;
    as Slicer's "transform from parent" and antsApplyTransforms take it)."""
    path = Path(path)
    companions = {FILES["transform"]: FILES["inverse"], FILES["inverse"]: FILES["transform"]}
    if path.is_dir():
        if not (path / FILES["transform"]).is_file():
            raise RegistrationError(f"{path}: holds no {FILES['transform']}; give a registration's output folder "
                                    "or a transform file")
        path = path / FILES["transform"]
    resampling = read_itk_transform(path)
    companion = path.with_name(companions[path.name]) if path.name in companions else None
    if companion is not None and companion.is_file():
        return Transforms(resampling, read_itk_transform(companion), str(path))
    try:
        points = resampling.GetInverse()
    except RuntimeError:  # a displacement field: no closed-form inverse
        points = None
    return Transforms(resampling, points, str(path))


def kind_of(path: str | Path, image: sitk.Image | None = None) -> str:
    """points (by extension), labels (a .seg.nrrd, or an integer image with few values), or image."""
    name = Path(path).name.lower()
    if name.endswith(POINT_SUFFIXES) and not name.endswith(".nii"):
        return "points"
    if is_segmentation_file(name):
        return "labels"
    if image is not None and image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                                    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64):
        if np.unique(sitk.GetArrayViewFromImage(image)).size <= MOST_LABELS:
            return "labels"
    return "image"


def apply_to_image(image: sitk.Image, reference: sitk.Image, transforms: Transforms, labels: bool,
                   interpolation: str | None = None) -> sitk.Image:
    """``image`` (input space) on ``reference``'s grid. Label maps keep their values and pixel type
    (label-aware Gaussian interpolation by default, or nearest) and a 0 background; images are
    interpolated linearly by default, their lowest value outside."""
    interpolation = interpolation or ("label" if labels else "linear")
    if labels and interpolation not in ("label", "nearest"):
        raise RegistrationError(f"a label map is interpolated by label or nearest, not {interpolation}")
    default = 0.0 if labels else float(np.min(sitk.GetArrayViewFromImage(image)))
    pixel = image.GetPixelID() if labels else sitk.sitkFloat32
    out = sitk.Resample(image, reference, transforms.resampling, INTERPOLATIONS[interpolation], default, pixel)
    return carry_segments(image, out)  # a segmentation's segments (names, colours, values) travel with it


def apply_to_points(landmarks: Landmarks, transforms: Transforms) -> Landmarks:
    """Input-space points (LPS mm) in output space."""
    if transforms.points is None:
        raise RegistrationError(f"{transforms.source}: points need the inverse of this displacement field; give "
                                f"the registration's folder, or its {FILES['transform']} with {FILES['inverse']} "
                                "beside it")
    moved = np.array([transforms.points.TransformPoint([float(v) for v in p]) for p in landmarks.points])
    return Landmarks(moved, list(landmarks.labels), landmarks.path)
