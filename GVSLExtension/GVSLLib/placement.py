"""Where a registration starts and where its results go in the scene: which nodes a run reads
through which transform, which nodes it reuses, and what it re-parents. One rule for each, here.

The rule for the moving volume: it is always read as stored (its own coordinates, as SlicerElastix
exports it), and the result transform replaces whatever transform it sat under. So that what the user
sees is where the run begins, a linear transform above the moving volume (placed by hand, or an
earlier rigid or affine result) is the run's initial transform unless another one is chosen; it is
applied once, also when it is chosen explicitly. A non-linear transform above it is refused before
the run, unless it is an earlier GVSL result, which the new result replaces.
"""
from __future__ import annotations

GRID_PART = "GVSL.gridPart"  # marks the grid node of a split result, so that a later split run reuses it
METRICS = "GVSL.metrics"  # a result transform's metrics (JSON); it also marks the node as a GVSL result
SOURCE_SEGMENTATION = "GVSL.sourceSegmentation"  # a propagated segmentation's reference to where it came from


def isResult(node) -> bool:
    """Whether ``node`` is a transform a GVSL registration wrote."""
    return node is not None and node.GetAttribute(METRICS) is not None


def placementProblem(fixedVolume, movingVolume, initialTransform=None) -> str:
    """Why the volumes' places in the scene cannot start a registration ("" when they can)."""
    fixedParent = fixedVolume.GetParentTransformNode()
    if fixedParent is not None and not fixedParent.IsTransformToWorldLinear():
        return (f"{fixedVolume.GetName()}: lies under the non-linear transform {fixedParent.GetName()!r}; harden it "
                "(Transforms module) or remove it first.")
    movingParent = movingVolume.GetParentTransformNode()
    if movingParent is not None and not movingParent.IsTransformToWorldLinear() and not isResult(movingParent):
        return (f"{movingVolume.GetName()}: lies under the non-linear transform {movingParent.GetName()!r}, which a "
                "registration cannot start from; harden it (Transforms module) or remove it first.")
    if initialTransform is not None and not initialTransform.IsTransformToWorldLinear():
        return (f"{initialTransform.GetName()}: the initial transform is not linear (it lies under a non-linear "
                "transform); pick a linear one.")
    return ""


def startingTransform(movingVolume, initialTransform=None):
    """The linear transform node the run starts from (module docstring), or None."""
    if initialTransform is not None:
        return initialTransform
    parent = movingVolume.GetParentTransformNode()
    if parent is not None and parent.IsTransformToWorldLinear():
        return parent
    return None


def showThroughResult(movingVolume, transform, outputVolume) -> None:
    """No output volume: the moving volume is shown through the result (its parent transform
    replaced), as SlicerElastix does; with one, nothing is re-parented."""
    if outputVolume is None:
        movingVolume.SetAndObserveTransformNodeID(transform.GetID())


def referenceVolumes(transform, fixedVolume, movingVolume) -> None:
    """The result transform names the volumes it registers (Slicer's roles, as SlicerElastix sets them)."""
    transform.SetNodeReferenceID(transform.GetFixedNodeReferenceRole(), fixedVolume.GetID())
    transform.SetNodeReferenceID(transform.GetMovingNodeReferenceRole(), movingVolume.GetID())


def earlierGridPart(transform):
    """The grid node an earlier split run put above ``transform`` (a reused linear node), else None."""
    parent = transform.GetParentTransformNode() if transform is not None else None
    return parent if parent is not None and parent.GetAttribute(GRID_PART) == "1" else None


def releaseGridPart(transform) -> None:
    """A reused node that held the linear part of a split result now holds a whole result: it leaves
    its grid part, which is removed when nothing else sits under it (no orphan grid nodes)."""
    grid = earlierGridPart(transform)
    transform.SetAndObserveTransformNodeID(None)
    if grid is None:
        return
    scene = grid.GetScene()
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if hasattr(node, "GetParentTransformNode") and node.GetParentTransformNode() is grid:
            return
    scene.RemoveNode(grid)


def propagatedSegmentation(scene, movingSegmentation, fixedVolume):
    """The segmentation an earlier run propagated from ``movingSegmentation`` onto ``fixedVolume``,
    to be refilled rather than a new one added each run; None the first time."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        source = node.GetNodeReference(SOURCE_SEGMENTATION)
        geometry = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        if source is movingSegmentation and geometry is fixedVolume:
            return node
    return None


def referenceSourceVolume(segmentation, volume, source=None) -> None:
    """A result segmentation names the volume it lies on (the reference geometry and its node
    reference, which DICOM SEG export needs) and, when propagated, the segmentation it came from."""
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    if source is not None:
        segmentation.SetNodeReferenceID(SOURCE_SEGMENTATION, source.GetID())
