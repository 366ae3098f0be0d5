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
    return resample(image, _box_grid(image, np.array(isotropic(spacing)), min_size=1), interpolator=interpolator)


def _box_grid(reference: sitk.Image, spacing: np.ndarray, min_size: int) -> sitk.Image:
    """An empty grid of ``spacing`` over ``reference``'s physical box, in its orientation: the first
    voxel's outer corner stays where it was, the size is rounded to whole voxels."""
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    size = np.maximum(min_size, np.round(extent / spacing)).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    corner = np.array(reference.GetOrigin()) - direction @ (np.array(reference.GetSpacing()) / 2)
    grid.SetOrigin((corner + direction @ (spacing / 2)).tolist())
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(reference.GetDirection())
    return grid


def index_to_physical(image: sitk.Image) -> np.ndarray:
    """4x4 matrix taking a voxel index (x, y, z, 1) to an LPS point in mm."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def working_grid(reference: sitk.Image, spacing: float, max_size: int | None = None) -> sitk.Image:
    """An empty isotropic grid over ``reference``'s extent, in its (flip-canonical) orientation.

    ``max_size`` caps the voxels per axis by coarsening the spacing.
    """
    reference = sitk.DICOMOrient(reference, CANONICAL_ORIENTATION)
    if max_size:
        extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
        spacing = max(spacing, float(extent.max()) / max_size)
    return _box_grid(reference, np.full(3, float(spacing)), min_size=8)


def resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
             interpolator: int = sitk.sitkLinear, default: float | None = None) -> sitk.Image:
    """``image`` on ``grid``; ``transform`` maps grid points to image points (ITK's direction)."""
    if default is None:
        default = float(sitk.GetArrayViewFromImage(image).min())
    pixel = image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(image, grid, transform or sitk.Transform(), interpolator, default, pixel)


def finer_grid(grid: sitk.Image) -> sitk.Image:
    """A grid of half the spacing with the same first and last voxel centres (2n - 1 voxels per axis), so
    that ``gvsl.spatial``'s normalised coordinates mean the same point on both."""
    fine = sitk.Image([2 * n - 1 for n in grid.GetSize()], sitk.sitkFloat32)
    fine.SetOrigin(grid.GetOrigin())
    fine.SetSpacing([s / 2 for s in grid.GetSpacing()])
    fine.SetDirection(grid.GetDirection())
    return fine


def field_of_view(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
                  soft: bool = False) -> sitk.Image:
    """Where ``image`` has data, on ``grid`` (``transform``: grid points to image points): 1 inside its
    extent, 0 outside; nearest neighbour (uint8), or with ``soft`` linearly interpolated (float32)."""
    ones = sitk.Image(image.GetSize(), sitk.sitkFloat32 if soft else sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return resample(ones, grid, transform, sitk.sitkLinear if soft else sitk.sitkNearestNeighbor, 0)


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 physical (LPS, mm) matrix as an ITK affine transform."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix[:3, :3].flatten().tolist())
    t.SetTranslation(matrix[:3, 3].tolist())
    return t


def transform_parts(transform: sitk.Transform) -> list[sitk.Transform]:
    """The transforms a (possibly nested) composite is made of, in its order, each downcast."""
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        return [part for i in range(transform.GetNumberOfTransforms())
                for part in transform_parts(transform.GetNthTransform(i))]
    return [transform]


def voxel_matrix_to_physical(voxel_matrix: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """A 3x4 centred voxel matrix of ``gvsl.spatial`` on ``grid`` as a 4x4 physical (LPS) matrix."""
    centre = (np.array(grid.GetSize()) - 1) / 2
    a = np.eye(4)
    a[:3, :3] = voxel_matrix[:, :3]
    a[:3, 3] = voxel_matrix[:, 3] + centre - voxel_matrix[:, :3] @ centre
    phi = index_to_physical(grid)
    return phi @ a @ np.linalg.inv(phi)


def physical_to_voxel_matrix(physical: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """The inverse of ``voxel_matrix_to_physical``: a 4x4 physical matrix as the 3x4 centred voxel
    matrix on ``grid``."""
    phi = index_to_physical(grid)
    a = np.linalg.inv(phi) @ physical @ phi
    centre = (np.array(grid.GetSize()) - 1) / 2
    return np.concatenate([a[:3, :3], (a[:3, 3] - centre + a[:3, :3] @ centre)[:, None]], axis=1)


def displacement_image(displacement_zyx: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A (3, D, H, W) voxel displacement (channels z, y, x) on ``grid`` as an LPS mm vector image."""
    xyz = np.moveaxis(displacement_zyx[::-1], 0, -1)  # (D, H, W, 3) in x, y, z voxels
    linear = np.array(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())
    image = sitk.GetImageFromArray((xyz @ linear.T).astype(np.float64), isVector=True)
    image.CopyInformation(grid)
    return image
