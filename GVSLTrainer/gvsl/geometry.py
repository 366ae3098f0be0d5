"""SimpleITK images <-> the network's voxel grid: the only module that knows LPS, spacing and direction cosines."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

# Array axes i, j, k point to Left, Posterior, Superior: ITK's identity direction for a non-oblique scan.
CANONICAL_ORIENTATION = "LPS"


def isotropic(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    if np.isscalar(spacing):
        return (float(spacing),) * 3
    values = tuple(float(s) for s in spacing)
    if len(values) != 3:
        raise ValueError(f"spacing needs 1 or 3 values, got {len(values)}")
    return values


def canonical(image: sitk.Image, spacing: float | Sequence[float] | None,
              interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """Reorient to the canonical axis order and resample to ``spacing`` (mm) over the same extent.

    Reorientation only permutes and flips axes (no interpolation); a residual obliqueness stays in
    the direction cosines, so the voxels are never rotated. ``spacing=None`` keeps the spacing.
    """
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    if spacing is None:
        return image
    new_spacing = np.array(isotropic(spacing))
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # keep the outer edge of the first voxel where it was
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    background = float(sitk.GetArrayViewFromImage(image).min())
    pixel = image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), interpolator, origin.tolist(),
                         new_spacing.tolist(), image.GetDirection(), background, pixel)
