"""Data and checks for the module's self-test, shared by ``GVSL.py``'s GVSLTest (inside Slicer, on
Slicer's MRHead sample) and the pytest suite (slicer-core, on the MNI template): a real head and a
copy of it moved by a known transform onto an oblique, anisotropic, non-cubic grid (SimpleITK only)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk

import slicer

from . import conversion


def knownTransform() -> sitk.AffineTransform:
    """fixed -> moving (LPS): 6 degrees about an oblique axis, a 4 % scaling and a 6 mm shift."""
    rotation = np.array(sitk.VersorTransform((0.3, 0.5, 1.0), np.radians(6)).GetMatrix()).reshape(3, 3)
    return sitk.AffineTransform((rotation * 1.04).flatten().tolist(), (6.0, -4.0, 3.0), (0.0, 0.0, 0.0))


def _centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint(((np.array(image.GetSize()) - 1) / 2).tolist()))


def knownTransformFor(moving: sitk.Image) -> sitk.AffineTransform:
    transform = knownTransform()
    transform.SetCenter(_centre(moving).tolist())
    return transform


def makePair(scene, head: sitk.Image, names: tuple[str, str] = ("GVSL self-test fixed", "GVSL self-test moving"),
             ) -> tuple:
    """(fixed node, moving node) from a real head: moving = the head, fixed(x) = moving(T(x)) on an
    oblique 2.5 x 2.2 x 3.5 mm grid, T = ``knownTransformFor(moving)``. Also the module's sample pair."""
    moving = sitk.Cast(head, sitk.sitkFloat32)
    fixedGrid = sitk.Image([64, 76, 44], sitk.sitkFloat32)
    fixedGrid.SetSpacing((2.5, 2.2, 3.5))
    fixedGrid.SetDirection(sitk.VersorTransform((1.0, 0.2, 0.1), 0.35).GetMatrix())
    fixedGrid.SetOrigin((_centre(moving) - (_centre(fixedGrid) - np.array(fixedGrid.GetOrigin()))).tolist())
    fixed = sitk.Resample(moving, fixedGrid, knownTransformFor(moving), sitk.sitkLinear, 0.0)
    nodes = []
    for image, name in zip((fixed, moving), names):
        nodes.append(conversion.volumeNodeFromImage(image, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)))
    return tuple(nodes)


def registrationError(transformNode, fixedNode, movingNode) -> np.ndarray:
    """Distances (mm) between where ``transformNode`` and the known transform send points of the
    fixed volume's central region (the outer border has no image content to register)."""
    image = conversion.imageFromVolumeNode(fixedNode)
    rng = np.random.default_rng(0)
    index = (0.2 + 0.6 * rng.uniform(size=(300, 3))) * (np.array(image.GetSize()) - 1)
    lps = np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    known = knownTransformFor(conversion.imageFromVolumeNode(movingNode, throughParent=False))  # as stored
    truth = np.array([known.TransformPoint(p.tolist()) for p in lps])
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, transformNode, transform)
    mapped = np.array([transform.TransformPoint(*p) for p in conversion.lpsToRas(lps)])
    return np.linalg.norm(conversion.rasToLps(mapped) - truth, axis=1)
