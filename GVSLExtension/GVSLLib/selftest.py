"""Data and checks for the module's self-test and its Sample Data pair, shared by ``GVSL.py`` (inside
Slicer) and the pytest suite (slicer-core): a real head and a copy of it moved by a known transform
onto an oblique, anisotropic, non-cubic grid (SimpleITK only).

The pair ships as two small files in ``Resources/SampleData`` (``scripts/make_sample_pair.py`` makes
them from the ICBM 2009a template), registered with Sample Data by local file URL and checksum, so
the Sample Data button, ``SampleData.downloadSamples`` and the self-test load the same two volumes
through Slicer's own loader, with no network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk

import slicer

from . import conversion, paths

SAMPLE_NAME = "GVSLHeadPair"
SAMPLE_FILES = ("GVSLSampleFixed.nrrd", "GVSLSampleMoving.nrrd")
SAMPLE_NODE_NAMES = ("GVSL sample fixed (oblique, moved)", "GVSL sample moving")
SAMPLE_CHECKSUMS = ("SHA256:1d65b6357706368f95d5064eb2e8f16c214a5705cd3bc9d15157a1c896b2359e",
                    "SHA256:992178839738645cf9d9eaafa1e7b7697c901727e06c3c28f1c815db0996ad23")


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


def samplePair(head: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """(fixed, moving) from a real head: moving = the head, fixed(x) = moving(T(x)) on an oblique
    2.5 x 2.2 x 3.5 mm grid, T = ``knownTransformFor(moving)``, in the head's pixel type."""
    fixedGrid = sitk.Image([64, 76, 44], head.GetPixelID())
    fixedGrid.SetSpacing((2.5, 2.2, 3.5))
    fixedGrid.SetDirection(sitk.VersorTransform((1.0, 0.2, 0.1), 0.35).GetMatrix())
    fixedGrid.SetOrigin((_centre(head) - (_centre(fixedGrid) - np.array(fixedGrid.GetOrigin()))).tolist())
    fixed = sitk.Resample(sitk.Cast(head, sitk.sitkFloat32), fixedGrid, knownTransformFor(head), sitk.sitkLinear, 0.0)
    if head.GetPixelID() != sitk.sitkFloat32:
        fixed = sitk.Cast(sitk.Round(fixed), head.GetPixelID())
    return fixed, head


def makePair(scene, head: sitk.Image, names: tuple[str, str] = ("GVSL self-test fixed", "GVSL self-test moving"),
             ) -> tuple:
    """(fixed node, moving node) of ``samplePair(head)``."""
    return tuple(conversion.volumeNodeFromImage(image, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name))
                 for image, name in zip(samplePair(head), names))


def sampleFiles() -> list[Path]:
    return [paths.resourcePath(f"SampleData/{name}") for name in SAMPLE_FILES]


def sampleDataSource() -> dict:
    """The keywords of ``SampleDataLogic.registerCustomSampleDataSource`` for the pair: its files by
    local URL, so that the Sample Data button and ``downloadSample`` both load it (a custom
    downloader is only called by the button)."""
    return dict(category="GVSL", sampleName=SAMPLE_NAME, uris=[f.as_uri() for f in sampleFiles()],
                fileNames=list(SAMPLE_FILES), nodeNames=list(SAMPLE_NODE_NAMES), checksums=list(SAMPLE_CHECKSUMS),
                loadFileTypes=["VolumeFile", "VolumeFile"],
                thumbnailFileName=str(paths.resourcePath("Icons/GVSL.png")))


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
