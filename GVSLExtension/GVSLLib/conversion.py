"""MRML nodes <-> SimpleITK images and transforms: the only place that knows Slicer's RAS.

SimpleITK and every file are LPS; Slicer is RAS. A point or vector changes by diag(-1, -1, 1), a
direction matrix D becomes diag(-1, -1, 1) D. Transforms keep ITK's resampling direction, which is
Slicer's "from parent" direction: fixed-space point -> moving-space point.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from .sceneguard import scratchNodes

FLIP = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS, its own inverse
FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])


class ConversionError(ValueError):
    """A node cannot be handed to gvsl (no image, a vector volume, a non-linear parent transform...)."""


def lpsToRas(points: np.ndarray) -> np.ndarray:
    """(..., 3) points or vectors, LPS -> RAS (the same operation converts back)."""
    return np.asarray(points, float) * np.array([-1.0, -1.0, 1.0])


rasToLps = lpsToRas


def _ijkToRas(node, throughParent: bool = True) -> np.ndarray:
    """4x4 IJK -> world RAS, including a linear parent transform (refused when non-linear) unless
    ``throughParent`` is False."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijkToRas = slicer.util.arrayFromVTKMatrix(m)
    parent = node.GetParentTransformNode() if throughParent else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ConversionError(f"{node.GetName()}: lies under the non-linear transform {parent.GetName()!r}; "
                                  "harden or remove it first")
        toWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(toWorld)
        ijkToRas = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToRas
    return ijkToRas


def imageFromVolumeNode(node, throughParent: bool = True) -> sitk.Image:
    """A scalar volume node as a SimpleITK image in LPS, placed where Slicer shows it (or, with
    ``throughParent`` False, where it lies without its parent transform)."""
    if node is None or node.GetImageData() is None:
        raise ConversionError(f"{node.GetName() if node else 'None'}: the volume has no image data")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ConversionError(f"{node.GetName()}: has {node.GetImageData().GetNumberOfScalarComponents()} "
                              "components per voxel; a scalar volume is needed")
    ijkToLps = FLIP4 @ _ijkToRas(node, throughParent)
    linear = ijkToLps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(np.array(slicer.util.arrayFromVolume(node)))  # (K, J, I), copied
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).flatten().tolist())
    image.SetOrigin(ijkToLps[:3, 3].tolist())
    return image


def _setGeometry(node, image: sitk.Image) -> None:
    direction = FLIP @ np.array(image.GetDirection()).reshape(3, 3)
    node.SetIJKToRASDirections(*direction.flatten().tolist())  # row-major 3x3
    node.SetSpacing(*image.GetSpacing())
    node.SetOrigin(*lpsToRas(image.GetOrigin()).tolist())


def volumeNodeFromImage(image: sitk.Image, node):
    """Fill a volume node with a SimpleITK image, geometry included."""
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    _setGeometry(node, image)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _rasMatrix(transform: sitk.AffineTransform):
    """The 4x4 RAS matrix (a vtkMatrix4x4) of an ITK affine (LPS, matrix about a centre)."""
    m = np.eye(4)
    m[:3, :3] = np.array(transform.GetMatrix()).reshape(3, 3)
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    m[:3, 3] = t + c - m[:3, :3] @ c
    return slicer.util.vtkMatrixFromArray(FLIP4 @ m @ FLIP4)


def linearTransformToNode(transform: sitk.AffineTransform, node):
    """An ITK affine (fixed -> moving, LPS) as a linear transform node's "from parent" matrix."""
    node.SetMatrixTransformFromParent(_rasMatrix(transform))
    return node


def linearTransformFromNode(node) -> sitk.AffineTransform:
    """What a linear transform node does to a node placed under it (world -> the node's space, RAS,
    through the node's own parents) as an ITK affine (LPS): the same mapping."""
    if not node.IsTransformToWorldLinear():
        raise ConversionError(f"{node.GetName()}: is not a linear transform; harden it or pick a linear one")
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromWorld(m)
    lps = FLIP4 @ slicer.util.arrayFromVTKMatrix(m) @ FLIP4
    return sitk.AffineTransform(lps[:3, :3].flatten().tolist(), lps[:3, 3].tolist())


def maskFromNode(node) -> sitk.Image:
    """A segmentation (every segment) or labelmap/scalar volume node as a binary LPS mask image."""
    if node.IsA("vtkMRMLSegmentationNode"):
        labels, _ = labelsFromSegmentation(node)
    else:
        labels = imageFromVolumeNode(node)
    return sitk.Cast(labels != 0, sitk.sitkUInt8)


def pointsFromMarkups(node) -> tuple[np.ndarray, list[str]]:
    """The defined control points of a markups node in world LPS (parent transforms applied), and labels."""
    points, labels = [], []
    for i in range(node.GetNumberOfControlPoints()):
        if hasattr(node, "GetNthControlPointPositionStatus") and \
                node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        world = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, world)
        points.append(world)
        labels.append(node.GetNthControlPointLabel(i) or str(i + 1))
    if not points:
        raise ConversionError(f"{node.GetName()}: has no placed control points")
    return rasToLps(np.array(points)), labels


def _gridTransform(displacement: sitk.Image):
    """A vtkOrientedGridTransform of an LPS displacement image (vectors and geometry to RAS)."""
    vectors = lpsToRas(sitk.GetArrayFromImage(displacement)).astype(np.float64)  # (K, J, I, 3)
    grid = vtk.vtkImageData()
    grid.SetDimensions(*displacement.GetSize())
    grid.SetSpacing(*displacement.GetSpacing())
    grid.SetOrigin(*lpsToRas(displacement.GetOrigin()))
    data = numpy_support.numpy_to_vtk(vectors.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE)
    data.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(data)
    direction = np.eye(4)
    direction[:3, :3] = FLIP @ np.array(displacement.GetDirection()).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def gridTransformToNode(displacement: sitk.Image, node):
    """An ITK displacement field (LPS mm vectors on the fixed grid) as a grid transform node."""
    node.SetAndObserveTransformFromParent(_gridTransform(displacement))
    return node


def compositeTransformToNode(affine: sitk.AffineTransform, displacement: sitk.Image, node):
    """fixed -> moving = affine(x + d(x)) in one transform node (the headless ``transform.h5``)."""
    linear = vtk.vtkMatrixToLinearTransform()
    linear.SetInput(_rasMatrix(affine))
    general = vtk.vtkGeneralTransform()
    general.PostMultiply()
    general.Concatenate(_gridTransform(displacement))  # applied first
    general.Concatenate(linear)
    node.SetAndObserveTransformFromParent(general)
    return node


def labelsFromSegmentation(segmentation, reference=None) -> tuple[sitk.Image, list[tuple[str, tuple]]]:
    """All segments as one label image (values 1..N in segment order) with each value's segment
    (name, colour): on ``reference``'s grid, or without one on the segmentation's own labelmap grid
    (cropped to the segments), which loses no resolution."""
    ids = segmentation.GetSegmentation().GetSegmentIDs()
    if not ids:
        raise ConversionError(f"{segmentation.GetName()}: the segmentation has no segments")
    scene = segmentation.GetScene()
    with scratchNodes(scene):  # the label map, and the colour table and display node the export adds
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation, ids, labelmap, reference):
            raise ConversionError(f"{segmentation.GetName()}: could not export the segments to a label map")
        image = imageFromVolumeNode(labelmap)
    segments = [segmentation.GetSegmentation().GetSegment(i) for i in ids]
    return image, [(s.GetName(), tuple(s.GetColor())) for s in segments]


def segmentationFromLabels(labels: sitk.Image, segments: dict[int, tuple[str, tuple]], node):
    """Replace ``node``'s segments by a label image's, named and coloured by ``segments``
    {value: (name, colour)}."""
    scene = node.GetScene()
    node.GetSegmentation().RemoveAllSegments()
    with scratchNodes(scene, keep=(node,)):  # the label map and its display node
        labelmap = volumeNodeFromImage(sitk.Cast(labels, sitk.sitkInt16),
                                       scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise ConversionError(f"{node.GetName()}: could not import the label map")
    for segmentId in node.GetSegmentation().GetSegmentIDs():
        segment = node.GetSegmentation().GetSegment(segmentId)
        label = segments.get(int(segment.GetLabelValue()))
        if label is not None:
            segment.SetName(label[0])
            segment.SetColor(*label[1])
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node
