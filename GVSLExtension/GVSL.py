"""GVSL: deep-learning registration and segmentation in 3D Slicer (Module, Widget and self-test).

All processing is in the Qt-free GVSLLib package (``GVSLLib.logic.GVSLLogic``); this file holds
only the GUI. Long work runs in a separate Python process so Slicer stays responsive.
"""
import json
import logging
from typing import Annotated, Union

import ctk
import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLLinearTransformNode, vtkMRMLMarkupsFiducialNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode)
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from GVSLLib import dependencies, paths, presets
from GVSLLib.logic import DEVICES, MODES, SIMILARITIES, GVSLLogic, formatMetrics


class GVSL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GVSL"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["GVSL for 3D Slicer developers"]
        self.parent.helpText = (
            "Register two volumes (affine + deformable, in physical space) or segment a volume with a "
            "fine-tuned GVSL model. The registration works without a model (optimisation only); a GVSL "
            "checkpoint gives it a starting point. See the project README for the command-line tools "
            "that pre-train and fine-tune models.")
        self.parent.acknowledgementText = (
            "Method: He et al., Geometric Visual Similarity Learning in 3D Medical Image Self-supervised "
            "Pre-training, CVPR 2023.")
        iconPath = paths.resourcePath("Icons/GVSL.png")
        if iconPath.exists():
            self.parent.icon = qt.QIcon(str(iconPath))
        slicer.app.connect("startupCompleted()", registerSampleData)


SAMPLE_NAMES = ("GVSL sample fixed (MRHead, oblique)", "GVSL sample moving (MRHead)")


def registerSampleData() -> None:
    """A pair to try Register on, in the Sample Data module: Slicer's MRHead (downloaded and cached by
    SampleData as usual) and a copy on an oblique, anisotropic grid moved by a known transform (the
    self-test's pair), so the result can be checked against the truth."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="GVSL", sampleName="GVSLHeadPair", uris=["MRHead"], fileNames=["MRHead"], nodeNames=[SAMPLE_NAMES[0]],
        thumbnailFileName=str(paths.resourcePath("Icons/GVSL.png")), customDownloader=loadSamplePair)


def loadSamplePair(source=None) -> list:
    """SampleData's button for the GVSL pair: returns the (fixed, moving) nodes, shown overlaid."""
    import SampleData

    from GVSLLib import conversion, selftest

    head = SampleData.downloadSample("MRHead")
    image = conversion.imageFromVolumeNode(head)
    slicer.mrmlScene.RemoveNode(head)  # the moving volume is the head itself
    fixed, moving = selftest.makePair(slicer.mrmlScene, image, SAMPLE_NAMES)
    slicer.util.setSliceViewerLayers(background=fixed, foreground=moving, foregroundOpacity=0.5, fit=True)
    return [fixed, moving]


@parameterNodeWrapper
class GVSLParameterNode:
    """Every setting of the module; saved with the scene."""
    # Register
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    registrationModel: str = ""  # a checkpoint file; empty: optimisation only
    iterations: Annotated[int, WithinRange(10, 5000)] = 100
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    splitTransforms: bool = False
    movingSegmentation: vtkMRMLSegmentationNode
    preset: Annotated[str, Choice(list(presets.NAMES))] = presets.CUSTOM  # names the options below
    registrationMode: Annotated[str, Choice(list(MODES))] = "deformable"
    similarity: Annotated[str, Choice(list(SIMILARITIES))] = "auto"
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    movingMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    initialTransform: vtkMRMLLinearTransformNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    # Segment
    segmentInputVolume: vtkMRMLScalarVolumeNode
    segmentationModel: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    # Both
    keepTemporaryFiles: bool = False


def modelPath(path) -> str:
    """The chosen model file, or "" for none (scenes saved by earlier versions hold "." for none)."""
    text = str(path or "").strip()
    return "" if text in ("", ".") else text


@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """A ctkPathLineEdit bound to a ``str`` parameter: Slicer's own connector binds ``pathlib.Path``,
    whose empty value is ``Path()`` and shows as "."; an empty string shows as an empty field."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and datatype == str

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) \
            else None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return modelPath(self._widget.currentPath)

    def write(self, value: str) -> None:
        self._widget.currentPath = modelPath(value)


class GVSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobButton = None
        self._devices = None  # the devices this Slicer's PyTorch can use, once known
        self._shownPreset = presets.CUSTOM  # the preset the options were last known to match
        self._followingPreset = False
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._pollJob)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(paths.resourcePath("UI/GVSL.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GVSLLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.progressBar.hide()
        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self._disableMissingDevices)

    def cleanup(self) -> None:
        self._cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(GVSLParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.fixedVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.fixedVolume = volume
                self._parameterNode.segmentInputVolume = volume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._shownPreset = self._parameterNode.preset
            if self._devices is not None:  # connectGui refills the device box: grey out again what is missing
                self._disableMissingDevices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Apply buttons are enabled only for valid inputs; the tooltip says what is missing."""
        p = self._parameterNode
        if self._followingPreset:  # the node changes under presets.follow: check once it is done
            return
        self._followingPreset = True
        try:  # a preset chosen in the box sets its options; an option set by hand renames the preset
            self._shownPreset = presets.follow(p, self._shownPreset)
        finally:
            self._followingPreset = False
        if self._job is not None:
            return
        problem = GVSLLogic.registrationInputsProblem(
            p.fixedVolume, p.movingVolume, modelPath(p.registrationModel), mode=p.registrationMode,
            outputTransform=p.outputTransform, splitTransforms=p.splitTransforms, fixedLandmarks=p.fixedLandmarks,
            movingLandmarks=p.movingLandmarks)
        device = "" if self._devices is None or p.device in self._devices else \
            f"The device {p.device!r} is not available to this Slicer's PyTorch; choose auto or cpu."
        problem = problem or device
        self.ui.registerButton.enabled = not problem
        self.ui.registerButton.toolTip = problem or "Register the moving volume onto the fixed one."
        problem = GVSLLogic.segmentationInputsProblem(p.segmentInputVolume, modelPath(p.segmentationModel)) or device
        self.ui.segmentButton.enabled = not problem
        self.ui.segmentButton.toolTip = problem or "Segment the volume with the fine-tuned model."

    def _availableDevices(self) -> set:
        """Devices PyTorch can use here, found once (torch is imported here, not at Slicer start-up)."""
        if self._devices is None:
            available = {"auto", "cpu"}
            try:
                import torch

                if torch.cuda.is_available():
                    available.add("cuda")
                if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                    available.add("mps")
            except (ImportError, OSError):  # not installed yet, or (Windows) a DLL that fails to load
                pass
            self._devices = available
        return self._devices

    def _disableMissingDevices(self) -> None:
        """Offer GPU devices only when there is one; re-applied after every connectGui, which refills the box."""
        available = self._availableDevices()
        model = self.ui.deviceComboBox.model()
        for index in range(self.ui.deviceComboBox.count):
            model.item(index).setEnabled(self.ui.deviceComboBox.itemText(index) in available)
        if self._parameterNode:
            self._checkCanApply()

    # ------------------------------------------------------------------ running
    def _ensureDependencies(self) -> bool:
        try:
            return dependencies.ensureDependencies(lambda text: slicer.util.confirmOkCancelDisplay(text, "GVSL"))
        except Exception as e:
            slicer.util.errorDisplay(str(e), windowTitle="GVSL")
            return False

    def onRegisterButton(self) -> None:
        p = self._parameterNode
        self._runOrCancel(self.ui.registerButton, self._registrationFinished, lambda: self.logic.startRegistration(
            p.fixedVolume, p.movingVolume, model=modelPath(p.registrationModel) or None,
            outputVolume=p.outputVolume, outputTransform=p.outputTransform, splitTransforms=p.splitTransforms,
            iterations=p.iterations, device=p.device, movingSegmentation=p.movingSegmentation,
            mode=p.registrationMode, similarity=p.similarity, fixedMask=p.fixedMask, movingMask=p.movingMask,
            initialTransform=p.initialTransform, fixedLandmarks=p.fixedLandmarks,
            movingLandmarks=p.movingLandmarks, keepTemporaryFiles=p.keepTemporaryFiles))

    def onSegmentButton(self) -> None:
        p = self._parameterNode
        self._runOrCancel(self.ui.segmentButton, self._segmentationFinished, lambda: self.logic.startSegmentation(
            p.segmentInputVolume, modelPath(p.segmentationModel), outputSegmentation=p.outputSegmentation,
            device=p.device, keepTemporaryFiles=p.keepTemporaryFiles))

    def _runOrCancel(self, button, onFinished, start) -> None:
        """An Apply button's click: Cancel while a run is going, else check dependencies and start one."""
        if self._job is not None:
            self._cancelJob()
            return
        if not self._ensureDependencies():
            return
        try:
            self._job = start()
        except Exception as e:
            logging.exception("GVSL could not start")
            slicer.util.errorDisplay(f"GVSL could not start: {e}", windowTitle="GVSL")
            return
        self._jobButton, self._onFinished = button, onFinished
        self._idleText = button.text
        button.text = "Cancel"
        button.enabled = True
        for other in (self.ui.registerButton, self.ui.segmentButton):
            if other is not button:
                other.enabled = False
        self._setInputsEnabled(False)
        self.ui.logTextEdit.clear()
        self.ui.logTextEdit.appendPlainText(" ".join(self._job.process.argv))
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._timer.start()

    def _setInputsEnabled(self, enabled: bool) -> None:
        """Every widget bound to a parameter: a run's inputs cannot change under it."""
        for widget in self.parent.findChildren(qt.QWidget):
            if widget.property("SlicerParameterName") is not None:
                widget.enabled = enabled

    def _pollJob(self) -> None:
        job = self._job
        for line in job.process.newLines():  # the live log
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.value = int(100 * job.process.fraction)
        self.ui.progressBar.format = f"{job.process.stage or 'Working'}: %p%"
        code = job.process.poll()
        if code is None:
            return
        for line in job.process.newLines():
            self.ui.logTextEdit.appendPlainText(line)
        self._endJob()
        logging.info(job.process.output)
        try:
            result = job.finish()  # raises with the process's own error message when it failed
        except Exception as e:
            self.ui.logCollapsibleButton.collapsed = False  # the log stays, open, after an error
            slicer.util.errorDisplay(f"GVSL failed: {e}", windowTitle="GVSL", detailedText=job.process.output)
            return
        if job.keep:
            self.ui.logTextEdit.appendPlainText(f"Temporary files kept in {job.workdir}")
        self._onFinished(result)

    def _cancelJob(self) -> None:
        if self._job is None:
            return
        job = self._job
        self._endJob()
        job.cancel()  # the scene is as it was: nodes are only created when a run finishes
        slicer.util.showStatusMessage("GVSL: cancelled", 3000)

    def _endJob(self) -> None:
        self._timer.stop()
        self._job = None
        self._jobButton.text = self._idleText
        self.ui.progressBar.hide()
        self._setInputsEnabled(True)
        self._checkCanApply()

    def _registrationFinished(self, nodes) -> None:
        p = self._parameterNode
        p.outputVolume = nodes.outputVolume
        if not p.splitTransforms:  # a split run's transform is its linear part, which cannot take a whole result
            p.outputTransform = nodes.transform
        # no output volume: the moving volume itself, now under the result transform
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=nodes.outputVolume or p.movingVolume,
                                         foregroundOpacity=0.5, fit=True)
        self.ui.metricsLabel.text = formatMetrics(nodes.metrics)

    def _segmentationFinished(self, segmentation) -> None:
        self._parameterNode.outputSegmentation = segmentation
        slicer.util.setSliceViewerLayers(background=self._parameterNode.segmentInputVolume, fit=True)


class GVSLTest(ScriptedLoadableModuleTest):
    """Registers Slicer's MRHead sample onto a copy moved by a known oblique transform."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_recovers_a_known_transform()

    def test_register_recovers_a_known_transform(self):
        missing = dependencies.missingPackages()
        if missing:  # a fresh Slicer (ctest) has no torch/MONAI until the module's first run installs them
            self.skipTest(f"GVSL self-test skipped: {', '.join(missing)} not installed; click Register once "
                          "in the GVSL module to install them")
        import numpy as np
        import SampleData

        from GVSLLib import selftest

        self.delayDisplay("Loading the GVSL sample pair (MRHead and a copy moved by a known transform)")
        registerSampleData()
        source = SampleData.SampleDataLogic.sampleDataSourcesByCategory("GVSL")[0]
        fixed, moving = source.customDownloader(source)  # what the Sample Data module's button calls
        self.delayDisplay("Registering")
        nodes = GVSLLogic().register(fixed, moving)
        error = selftest.registrationError(nodes.transform, fixed, moving)
        logging.info(f"GVSL self-test: median error {np.median(error):.2f} mm, metrics {json.dumps(nodes.metrics)}")
        self.assertLess(float(np.median(error)), 1.0)
        self.assertLess(float(np.percentile(error, 95)), 2.0)
        self.delayDisplay("Test passed")
