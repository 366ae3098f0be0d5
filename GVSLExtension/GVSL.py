"""GVSL: deep-learning registration and segmentation in 3D Slicer (Module, Widget and self-test).

All processing is in the Qt-free GVSLLib package (``GVSLLib.logic.GVSLLogic``); this file holds
only the GUI. Long work runs in a separate Python process so Slicer stays responsive.
"""
import json
import logging
import time
import typing
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

from GVSLLib import dependencies, panel, paths, presets, selftest
from GVSLLib.logic import DEVICES, MODES, SIMILARITIES, GVSLLogic, formatMetrics


class GVSL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GVSL"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["GVSL for 3D Slicer developers"]
        self.parent.helpText = (
            "Register two volumes (rigid, affine or deformable, in physical space) or segment a volume with a "
            "fine-tuned GVSL model. The registration works without a model (optimisation only); a GVSL "
            "checkpoint gives it a starting point. The moving volume is registered as stored; a linear transform "
            "it sits under is the starting point, and with no output volume the result transform takes its place. "
            "See the project README for the command-line tools that pre-train and fine-tune models.")
        self.parent.acknowledgementText = (
            "Method: He et al., Geometric Visual Similarity Learning in 3D Medical Image Self-supervised "
            "Pre-training, CVPR 2023. Sample data: the ICBM 2009a template, Copyright (C) 1993-2009 Louis Collins, "
            "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University.")
        iconPath = paths.resourcePath("Icons/GVSL.png")
        if iconPath.exists():
            self.parent.icon = qt.QIcon(str(iconPath))
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """The self-test's pair in the Sample Data module (category GVSL): a head, and a copy moved by a
    known transform onto an oblique, anisotropic grid, so a result can be checked against the truth.
    The files ship with the module; the button and ``SampleData.downloadSamples("GVSLHeadPair")``
    load them alike."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**selftest.sampleDataSource())


@parameterNodeWrapper
class GVSLParameterNode:
    """Every setting of the module; saved with the scene. A union of node types includes None: the
    wrapper writes None to a fresh parameter node."""
    # Register
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    registrationModel: str = ""  # a checkpoint file; empty: optimisation only
    iterations: Annotated[int, WithinRange(10, 5000)] = 100
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputVolume: vtkMRMLScalarVolumeNode  # None: the moving volume is shown through the result transform
    outputTransform: vtkMRMLTransformNode  # None: a new one
    splitTransforms: bool = False
    movingSegmentation: vtkMRMLSegmentationNode
    preset: Annotated[str, Choice(list(presets.NAMES))] = presets.CUSTOM  # names the options below
    registrationMode: Annotated[str, Choice(list(MODES))] = "deformable"
    similarity: Annotated[str, Choice(list(SIMILARITIES))] = "auto"
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    movingMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    initialTransform: vtkMRMLLinearTransformNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    # Segment
    segmentInputVolume: vtkMRMLScalarVolumeNode
    segmentationModel: str = ""
    segmentationAtlases: str = ""  # instead of a model: a CSV of atlases (columns image and labels)
    segmentationAtlasNodes: list[vtkMRMLSegmentationNode]  # or the scene's: segmentations on their source volumes
    outputSegmentation: vtkMRMLSegmentationNode
    # Both
    keepTemporaryFiles: bool = False


class OneWidgetConnector(GuiConnector):
    """What GVSL.py's connectors share: one widget, followed through its ``signal``; each says what it
    represents (``canRepresent``) and how it reads and writes."""
    signal = ""

    @classmethod
    def create(cls, widget, datatype):
        return cls(widget) if cls.canRepresent(widget, datatype) else None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        getattr(self._widget, self.signal).connect(self.changed)

    def _disconnect(self) -> None:
        getattr(self._widget, self.signal).disconnect(self.changed)

    def widget(self):
        return self._widget


@parameterNodeGuiConnector
class PathLineEditToStrConnector(OneWidgetConnector):
    """A ctkPathLineEdit bound to a ``str`` parameter: Slicer's own connector binds ``pathlib.Path``,
    whose empty value is ``Path()`` and shows as "."; an empty string shows as an empty field."""
    signal = "currentPathChanged"

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and datatype == str

    def read(self) -> str:
        return paths.chosenFile(self._widget.currentPath)

    def write(self, value: str) -> None:
        self._widget.currentPath = paths.chosenFile(value)


@parameterNodeGuiConnector
class CheckableNodeComboBoxToNodeListConnector(OneWidgetConnector):
    """A qMRMLCheckableNodeComboBox bound to a ``list`` of nodes (the checked ones): Slicer has no
    connector for a list of nodes."""
    signal = "checkedNodesChanged"

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == slicer.qMRMLCheckableNodeComboBox and typing.get_origin(datatype) is list

    def read(self) -> list:
        return list(self._widget.checkedNodes())

    def write(self, value) -> None:
        wanted = [node for node in value if node is not None]  # None: a node the scene no longer has
        for node in self._widget.checkedNodes():
            if node not in wanted:
                self._widget.setCheckState(node, qt.Qt.Unchecked)
        for node in wanted:
            self._widget.setCheckState(node, qt.Qt.Checked)


class GVSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel: every decision is in GVSLLib (``panel``, ``placement``, ``logic``). Nothing here
    imports torch; the work runs in a child process, which reports the device it used."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobButton = None
        self._keptFolder = None  # the last run's temporary files, when kept
        self._shownPreset = presets.CUSTOM  # the preset the options were last known to match
        self._following = False
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
        self.ui.openTemporaryFolderButton.connect("clicked(bool)", self.onOpenTemporaryFolder)
        self.ui.openTemporaryFolderButton.enabled = False
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

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
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._shownPreset = self._parameterNode.preset
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """The options follow the preset and the mode (``panel.follow``); the buttons say whether they
        can run and, in their tooltip, why not."""
        if self._following:  # the node changes under panel.follow: act once it is done
            return
        self._following = True
        try:
            self._shownPreset, message = panel.follow(self._parameterNode, self._shownPreset)
        finally:
            self._following = False
        if message:
            self.ui.logTextEdit.appendPlainText(message)
            slicer.util.showStatusMessage(f"GVSL: {message}", 5000)
        if self._job is not None:
            return
        states = panel.buttonStates(self._parameterNode)
        for button, name in ((self.ui.registerButton, "register"), (self.ui.segmentButton, "segment")):
            button.enabled, button.toolTip = states[name]

    # ------------------------------------------------------------------ running
    def _ensureDependencies(self) -> bool:
        def restart(text: str) -> None:
            if slicer.util.confirmYesNoDisplay(text + "\n\nRestart Slicer now?", windowTitle="GVSL"):
                slicer.util.restart()

        try:
            return dependencies.ensureDependencies(
                lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle="GVSL"), restart)
        except Exception as e:
            slicer.util.errorDisplay(str(e), windowTitle="GVSL")
            return False

    def onRegisterButton(self) -> None:
        p = self._parameterNode
        self._runOrCancel(self.ui.registerButton, self._registrationFinished,
                          lambda: self.logic.startRegistration(**panel.registrationArguments(p)))

    def onSegmentButton(self) -> None:
        p = self._parameterNode
        self._runOrCancel(self.ui.segmentButton, self._segmentationFinished,
                          lambda: self.logic.startSegmentation(**panel.segmentationArguments(p)))

    def onOpenTemporaryFolder(self) -> None:
        if self._keptFolder is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._keptFolder)))

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
        finally:
            self._keepFolder(job)
        self._onFinished(result)

    def _keepFolder(self, job) -> None:
        self._keptFolder = job.workdir if job.keep else None
        self.ui.openTemporaryFolderButton.enabled = self._keptFolder is not None
        if self._keptFolder is not None:
            self.ui.logTextEdit.appendPlainText(f"Temporary files kept in {job.workdir}")

    def _cancelJob(self) -> None:
        if self._job is None:
            return
        job = self._job
        self._endJob()
        job.cancel()  # returns at once; the scene is as it was: nodes are only created when a run finishes
        self._keepFolder(job)
        slicer.util.showStatusMessage("GVSL: cancelled", 3000)

    def _endJob(self) -> None:
        self._timer.stop()
        self._job = None
        self._jobButton.text = self._idleText
        self.ui.progressBar.hide()
        self._setInputsEnabled(True)
        self._onParameterNodeModified()

    def _registrationFinished(self, nodes) -> None:
        p = self._parameterNode
        panel.keepResults(p, nodes)
        # no output volume: the moving volume itself, now under the result transform
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=nodes.outputVolume or p.movingVolume,
                                         foregroundOpacity=0.5, fit=True)
        self.ui.metricsLabel.text = formatMetrics(nodes.metrics)

    def _segmentationFinished(self, segmentation) -> None:
        self._parameterNode.outputSegmentation = segmentation
        slicer.util.setSliceViewerLayers(background=self._parameterNode.segmentInputVolume, fit=True)


class GVSLTest(ScriptedLoadableModuleTest):
    """Registers the Sample Data pair (a head and a copy moved by a known oblique transform) the way the
    Register button does, in a child process, and checks the result against the known transform."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_recovers_a_known_transform()

    def test_register_recovers_a_known_transform(self):
        missing = dependencies.missingPackages()
        if missing:  # a fresh Slicer (ctest) has no torch/MONAI until the module's first run installs them
            message = (f"GVSL self-test not run: {', '.join(missing)} not installed; click Register once in the "
                       "GVSL module to install them")
            logging.warning(message)
            self.delayDisplay(message)
            return
        import numpy as np
        import SampleData

        self.delayDisplay("Loading the GVSL sample pair (a head and a copy moved by a known transform)")
        registerSampleData()
        fixed, moving = SampleData.downloadSamples(selftest.SAMPLE_NAME)
        self.delayDisplay("Registering in a background process, as the Register button does")
        job = GVSLLogic().startRegistration(fixed, moving)
        deadline = time.monotonic() + 900
        while job.process.poll() is None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.1)
        if job.process.poll() is None:
            job.cancel()
            self.fail(f"the registration did not finish in 15 minutes:\n{job.process.output}")
        nodes = job.finish()
        error = selftest.registrationError(nodes.transform, fixed, moving)
        logging.info(f"GVSL self-test: median error {np.median(error):.2f} mm, metrics {json.dumps(nodes.metrics)}")
        self.assertLess(float(np.median(error)), 1.0)
        self.assertLess(float(np.percentile(error, 95)), 2.0)
        self.assertIs(moving.GetParentTransformNode(), nodes.transform)  # shown through the result
        self.delayDisplay("Test passed")
