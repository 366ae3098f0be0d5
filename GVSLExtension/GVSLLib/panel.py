"""What the module's panel enables, runs and keeps selected: the decisions behind GVSL.py's buttons,
Qt-free so that they are tested on slicer-core. The widget only binds them to its parameter node.

``p`` is the module's parameter node (``GVSLParameterNode``) or any object with its fields.
"""
from __future__ import annotations

from . import presets
from .atlases import sceneAtlases
from .logic import GVSLLogic
from .paths import chosenFile

REGISTER_TIP = "Register the moving volume onto the fixed one."
SEGMENT_TIP = "Segment the volume with the fine-tuned model, or with the atlases (label fusion)."


def registrationArguments(p) -> dict:
    """``GVSLLogic.startRegistration``'s keywords from the parameter node: every setting, once."""
    return dict(fixedVolume=p.fixedVolume, movingVolume=p.movingVolume, model=chosenFile(p.registrationModel) or None,
                outputVolume=p.outputVolume, outputTransform=p.outputTransform, splitTransforms=p.splitTransforms,
                iterations=p.iterations, device=p.device, movingSegmentation=p.movingSegmentation,
                mode=p.registrationMode, similarity=p.similarity, fixedMask=p.fixedMask, movingMask=p.movingMask,
                initialTransform=p.initialTransform, fixedLandmarks=p.fixedLandmarks,
                movingLandmarks=p.movingLandmarks, keepTemporaryFiles=p.keepTemporaryFiles)


def segmentationArguments(p) -> dict:
    """``GVSLLogic.startSegmentation``'s keywords from the parameter node."""
    return dict(inputVolume=p.segmentInputVolume, model=chosenFile(p.segmentationModel),
                outputSegmentation=p.outputSegmentation, device=p.device, keepTemporaryFiles=p.keepTemporaryFiles,
                atlases=chosenFile(p.segmentationAtlases) or sceneAtlases(p.segmentationAtlasNodes) or None)


def buttonStates(p) -> dict[str, tuple[bool, str]]:
    """{"register" | "segment": (enabled, tooltip)}: a button is enabled only for inputs that can run,
    and its tooltip says what is missing."""
    a = registrationArguments(p)
    problem = GVSLLogic.registrationInputsProblem(
        a["fixedVolume"], a["movingVolume"], a["model"], a["mode"], a["outputTransform"], a["splitTransforms"],
        a["fixedLandmarks"], a["movingLandmarks"], a["outputVolume"], a["initialTransform"])
    states = {"register": (not problem, problem or REGISTER_TIP)}
    a = segmentationArguments(p)
    problem = GVSLLogic.segmentationInputsProblem(a["inputVolume"], a["model"], a["atlases"])
    if a["inputVolume"] is not None and chosenFile(p.segmentationAtlases) and sceneAtlases(p.segmentationAtlasNodes):
        problem = "Choose atlases from the scene or a CSV, not both."
    states["segment"] = (not problem, problem or SEGMENT_TIP)
    return states


def fitOutputToMode(p) -> str:
    """A linear output transform cannot hold a deformable result (one composite transform). Instead of
    blocking Register, the output goes to a new transform node, and the linear node (a rigid result
    being refined, say) becomes the initial transform when none is chosen. Returns what changed, for
    the log ("" when nothing did)."""
    output = p.outputTransform
    if p.registrationMode != "deformable" or p.splitTransforms or output is None \
            or not output.IsA("vtkMRMLLinearTransformNode"):
        return ""
    p.outputTransform = None
    message = f"{output.GetName()} is linear and cannot hold a deformable result: the result goes to a new transform"
    if p.initialTransform is None and output.IsTransformToWorldLinear():
        p.initialTransform = output
        message += f", starting from {output.GetName()}"
    return message + "."


def follow(p, shownPreset: str) -> tuple[str, str]:
    """Bring the parameter node into agreement after a change: the preset box and the options it names
    (``presets.follow``), and the output transform and the mode. Returns the preset now shown and a
    message for the log ("" when nothing needed saying)."""
    shown = presets.follow(p, shownPreset)
    return shown, fitOutputToMode(p)


def keepResults(p, nodes) -> None:
    """After a registration the panel selects its result transform (for a split result, the linear
    node above the grid node), so that the next run writes into the same nodes instead of adding new
    ones; the output volume selection stays as it was (None: the moving volume is shown through the
    result)."""
    p.outputTransform = nodes.transform
