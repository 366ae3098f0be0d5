"""GVSL.py run through Slicer's own Python: its ``parameterNodeWrapper``, ``ScriptedLoadableModule``
and ``SampleData``, read from a Slicer source tree, beside slicer-core's real MRML. Only what needs
the application (Qt, CTK, the qMRML widgets, ``slicer.app``) is an inert stand-in
(``slicer_gui_standins``).

Opt-in: set ``GVSL_SLICER_SOURCE`` to a Slicer source tree, e.g.
``git --git-dir=<Slicer.git> archive HEAD Base/Python Modules/Scripted/SampleData | tar -x -C /tmp/slicer``.
"""
from __future__ import annotations

import importlib
import time
import os
import sys
import types
from pathlib import Path

import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[1]
SOURCE = os.environ.get("GVSL_SLICER_SOURCE")
pytestmark = pytest.mark.skipif(not SOURCE, reason="GVSL_SLICER_SOURCE (a Slicer source tree) is not set")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_gui_standins as standins  # noqa: E402
from slicer_scene import close_scene, load_volume, new_scene, node_ids  # noqa: E402


@pytest.fixture(scope="module")
def gui(tmp_path_factory):
    """Slicer's Python and the stand-ins in place, GVSL.py imported through them (once: importing it
    registers its GUI connector with Slicer's wrapper)."""
    with pytest.MonkeyPatch.context() as mp:
        harness = standins.install(mp, Path(SOURCE), tmp_path_factory.mktemp("slicer_temp"))
        mp.syspath_prepend(str(ROOT / "GVSLExtension"))
        mp.syspath_prepend(str(Path(SOURCE) / "Modules" / "Scripted" / "SampleData"))  # Slicer's SampleData module
        for name in [n for n in sys.modules if n == "GVSL" or n.startswith("GVSLLib")]:
            mp.delitem(sys.modules, name)
        harness.GVSL = importlib.import_module("GVSL")
        yield harness
        for name in [n for n in sys.modules if n == "GVSL" or n.startswith("slicer.parameterNodeWrapper")
                     or n in ("slicer.ScriptedLoadableModule", "slicer.i18n", "SampleData")]:
            sys.modules.pop(name, None)


@pytest.fixture
def scene(gui, tmp_path):
    """A fresh scene as the application sets it up, with its download cache, as ``slicer.mrmlScene``."""
    scene = new_scene(tmp_path / "cache")
    gui.widgets = []
    for shown in vars(gui.shown).values():
        shown.clear()
    yield scene
    for widget in gui.widgets:
        widget.cleanup()
    close_scene(scene)


def open_module(gui):
    """What Slicer does when the module is shown the first time: module, widget, setup, enter."""
    module = gui.GVSL.GVSL(types.SimpleNamespace(path=str(ROOT / "GVSLExtension" / "GVSL.py")))
    panel = standins.qSlicerModuleWidget()
    widget = gui.GVSL.GVSLWidget(panel)
    gui.widgets.append(widget)
    widget.setup()
    panel.isEntered = True
    widget.enter()
    standins.processEvents()
    return module, widget


def bound_widgets(widget) -> dict:
    """{parameter name: its widget} as the .ui file binds them."""
    return {w.property("SlicerParameterName"): w for w in widget.parent.findChildren(standins.QWidget)
            if w.property("SlicerParameterName")}


def shown_value(w):
    """What a bound widget shows, in the parameter's terms."""
    if isinstance(w, standins.qMRMLCheckableNodeComboBox):
        return w.checkedNodes()
    if isinstance(w, standins.qMRMLNodeComboBox):
        return w.currentNode()
    if isinstance(w, standins.QAbstractButton):
        return w.checked
    if isinstance(w, standins.QSpinBox):
        return w.value
    if isinstance(w, standins.QComboBox):
        return w.currentText
    return w.currentPath


def load_sample_pair(gui):
    """The module's Sample Data pair, loaded by Slicer's own SampleData code."""
    gui.app.emit("startupCompleted()")  # GVSL registers its sample source then
    import SampleData

    return SampleData.downloadSamples("GVSLHeadPair")


def run_button(widget, button, timeout: float = 600.0):
    """Click ``button`` and let the module's poll timer run until the job is done."""
    button.click()
    deadline = time.monotonic() + timeout
    while widget._job is not None and time.monotonic() < deadline:
        standins.fireTimers()
        time.sleep(0.1)
    assert widget._job is None, "the run did not finish"


def test_the_module_opens_on_a_fresh_scene_and_binds_its_gui(gui, scene):
    _, widget = open_module(gui)
    p = widget._parameterNode
    assert p is not None and widget._parameterNodeGuiTag is not None
    assert gui.shown.errors == []
    assert not widget.ui.registerButton.enabled and widget.ui.registerButton.toolTip == "Select a fixed and a moving volume."
    assert not widget.ui.segmentButton.enabled and widget.ui.segmentButton.toolTip == "Select a volume to segment."
    # every parameter has a widget, bound: each shows its parameter's default
    widgets = bound_widgets(widget)
    assert set(widgets) == set(gui.GVSL.GVSLParameterNode.allParameters)
    for name, w in widgets.items():
        expected = p.getValue(name)
        assert shown_value(w) == (str(expected) if isinstance(w, standins.QComboBox) else expected), name
    # the .ui's connections gave every node selector the scene
    for w in widgets.values():
        if isinstance(w, standins.qMRMLNodeComboBox):
            assert w.mrmlScene() is scene, w.name


def test_opening_with_volumes_selects_one_and_enables_nothing_half_set(gui, scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "head")
    _, widget = open_module(gui)
    p = widget._parameterNode
    assert p.fixedVolume is volume and p.segmentInputVolume is volume
    assert not widget.ui.registerButton.enabled  # no moving volume yet


def nodes_for_every_parameter(scene) -> dict:
    """A non-default value for each parameter, of the kinds a user would pick."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mask seg")
    return dict(
        fixedVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed"),
        movingVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving"),
        registrationModel="/models/gvsl v2.0/gvsl_pretrained.pt", iterations=250, device="cpu",
        outputVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped"),
        outputTransform=scene.AddNewNodeByClass("vtkMRMLTransformNode", "result"), splitTransforms=True,
        movingSegmentation=scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tissue"),
        preset="CT↔MR, rigid", registrationMode="rigid", similarity="mi",
        fixedMask=seg, movingMask=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask labels"),
        initialTransform=scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start"),
        fixedLandmarks=scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F"),
        movingLandmarks=scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M"),
        segmentInputVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct"),
        segmentationModel="/models/gvsl_segmentation.pt", segmentationAtlases="/atlases/table.csv",
        segmentationAtlasNodes=[scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"atlas {i}") for i in (1, 2)],
        outputSegmentation=scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels"),
        keepTemporaryFiles=True)


def test_every_parameter_is_set_read_shown_cleared_and_restored_with_the_scene(gui, scene, tmp_path):
    _, widget = open_module(gui)
    p = widget._parameterNode
    values = nodes_for_every_parameter(scene)
    assert set(values) == set(gui.GVSL.GVSLParameterNode.allParameters)
    widgets = bound_widgets(widget)
    for name, value in values.items():
        setattr(p, name, value)
    for name, value in values.items():  # the preset stays: its options match what was set
        assert getattr(p, name) == value, name
        assert shown_value(widgets[name]) == value, name
    nodes = {n for n, v in values.items() if hasattr(v, "GetID")}
    for name in nodes:  # every node parameter can be cleared
        setattr(p, name, None)
        assert getattr(p, name) is None and shown_value(widgets[name]) is None, name
    for name in nodes:
        setattr(p, name, values[name])
    p.segmentationAtlasNodes = values["segmentationAtlasNodes"][1:]  # a list of nodes: one unchecked
    assert shown_value(widgets["segmentationAtlasNodes"]) == values["segmentationAtlasNodes"][1:]
    widgets["segmentationAtlasNodes"].setCheckState(values["segmentationAtlasNodes"][0], standins.Qt.Checked)
    assert set(p.segmentationAtlasNodes) == set(values["segmentationAtlasNodes"])  # the GUI's check reaches it
    p.segmentationAtlasNodes = values["segmentationAtlasNodes"]
    # saved with the scene and restored: the same values, the node references by name
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    restored = slicer.vtkMRMLScene()
    restored.SetURL(str(tmp_path / "scene.mrml"))
    assert restored.Connect()
    again = gui.GVSL.GVSLParameterNode(restored.GetSingletonNode("GVSL", "vtkMRMLScriptedModuleNode"))
    def named(value):
        return [n.GetName() for n in value] if isinstance(value, list) else value.GetName()

    for name, value in values.items():
        got = getattr(again, name)
        lists = name == "segmentationAtlasNodes"
        assert (named(list(got)) if lists else got.GetName() if name in nodes else got) == \
            (named(value) if lists else value.GetName() if name in nodes else value), name
    assert gui.shown.errors == []


def test_what_the_user_does_in_the_gui_reaches_the_parameter_node(gui, scene):
    _, widget = open_module(gui)
    p = widget._parameterNode
    w = bound_widgets(widget)
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    w["fixedVolume"].setCurrentNode(fixed)
    w["movingMask"].setCurrentNode(labels)
    w["splitTransforms"].click()
    w["iterations"].value = 40
    w["similarity"].currentIndex = w["similarity"].findText("mind")
    w["registrationModel"].currentPath = "/models/m.pt"
    assert (p.fixedVolume, p.movingMask, p.splitTransforms, p.iterations, p.similarity, p.registrationModel) == \
        (fixed, labels, True, 40, "mind", "/models/m.pt")
    # a preset chosen in the box sets its options, and an option set by hand renames the preset
    w["preset"].currentIndex = w["preset"].findText("CT↔MR, rigid")
    assert (p.registrationMode, p.similarity) == ("rigid", "mi")
    w["registrationMode"].currentIndex = w["registrationMode"].findText("affine")
    assert p.preset == "Custom" and w["preset"].currentText == "Custom"  # affine with MI: no preset's
    w["similarity"].currentIndex = w["similarity"].findText("auto")
    assert p.preset == "Affine, any modality" and w["preset"].currentText == "Affine, any modality"
    w["registrationModel"].currentPath = ""
    assert p.registrationModel == "" and w["registrationModel"].currentPath == ""


def test_the_module_reopens_bound_after_the_scene_is_closed(gui, scene):
    _, widget = open_module(gui)
    widget._parameterNode.iterations = 321
    scene.Clear(False)  # File > Close Scene: StartCloseEvent, then EndCloseEvent (the singleton is reset)
    assert widget._parameterNode is not None and widget._parameterNode.iterations == 100
    assert scene.GetSingletonNode("GVSL", "vtkMRMLScriptedModuleNode") is widget._parameterNode.parameterNode
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    bound_widgets(widget)["fixedVolume"].setCurrentNode(volume)
    assert widget._parameterNode.fixedVolume is volume
    widget.exit()
    widget.enter()
    assert bound_widgets(widget)["fixedVolume"].currentNode() is volume
    assert gui.shown.errors == []


class _NoTorch(types.ModuleType):
    """``torch`` in Slicer's process: any use is a failure (the module must leave it to the child)."""

    def __getattr__(self, name):
        if name in ("__spec__", "__path__", "__file__", "__loader__"):
            raise AttributeError(name)
        raise AssertionError(f"torch.{name} used in Slicer's process")


def test_opening_and_using_the_panel_never_touches_torch(gui, scene, monkeypatch):
    import importlib.util

    spec = importlib.util.find_spec("torch")
    no_torch = _NoTorch("torch")
    no_torch.__spec__ = spec
    monkeypatch.setitem(sys.modules, "torch", no_torch)
    _, widget = open_module(gui)
    p = widget._parameterNode
    p.fixedVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "f")
    p.movingVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "m")
    p.device = "cuda"  # offered without asking torch: the child says whether it can
    assert widget.ui.registerButton.enabled
    assert [widget.ui.deviceComboBox.itemText(i) for i in range(widget.ui.deviceComboBox.count)] == \
        list(gui.GVSL.DEVICES)


def test_the_sample_pair_loads_from_the_button_and_from_download_sample(gui, scene):
    open_module(gui)
    nodes = load_sample_pair(gui)
    assert [n.GetName() for n in nodes] == ["GVSL sample fixed (oblique, moved)", "GVSL sample moving"]
    assert all(n.IsA("vtkMRMLScalarVolumeNode") and n.GetImageData() is not None for n in nodes)
    import SampleData

    source = SampleData.SampleDataLogic().sourceForSampleName("GVSLHeadPair")
    assert source.customDownloader is None  # so the button takes downloadSample's path: the same nodes
    first = SampleData.downloadSample("GVSLHeadPair")
    assert first.GetName().startswith("GVSL sample fixed") and first.GetImageData().GetDimensions() == (64, 76, 44)


def test_register_runs_in_a_child_and_adds_only_its_result_nodes(gui, scene):
    """Click Register twice on the sample pair: the first run adds the result transform (and nothing
    else); the second writes into the same node; the moving volume is shown through it."""
    _, widget = open_module(gui)
    fixed, moving = load_sample_pair(gui)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume, p.registrationMode, p.iterations = fixed, moving, "rigid", 10
    p.keepTemporaryFiles = True
    assert widget.ui.registerButton.enabled, widget.ui.registerButton.toolTip
    before = node_ids(scene)
    run_button(widget, widget.ui.registerButton)
    assert gui.shown.errors == [], widget.ui.logTextEdit.toPlainText()
    added = [scene.GetNodeByID(i) for i in node_ids(scene) - before]
    transform = p.outputTransform
    assert [n.GetClassName() for n in added] == ["vtkMRMLLinearTransformNode"] and added[0] is transform
    assert moving.GetParentTransformNode() is transform
    assert transform.GetNodeReference(transform.GetMovingNodeReferenceRole()) is moving
    assert transform.GetNodeReference(transform.GetFixedNodeReferenceRole()) is fixed
    assert "on cpu" in widget.ui.metricsLabel.text and "on cpu" in widget.ui.logTextEdit.toPlainText()
    assert widget.ui.registerButton.text == "Register" and widget.ui.registerButton.enabled
    # the kept temporary folder opens from the log section
    assert widget.ui.openTemporaryFolderButton.enabled
    widget.ui.openTemporaryFolderButton.click()
    folder = Path(standins.QDesktopServices.opened[-1].toLocalFile())
    assert (folder / "out" / "metrics.json").is_file()
    # again: the same node is refilled, starting from where the moving volume now is
    before = node_ids(scene)
    run_button(widget, widget.ui.registerButton)
    assert node_ids(scene) == before and p.outputTransform is transform
    assert moving.GetParentTransformNode() is transform and gui.shown.errors == []


def test_split_runs_and_rigid_runs_reuse_their_nodes_from_the_gui(gui, scene):
    """Split mode keeps its linear node selected, so a second split run adds nothing; a rigid run into
    that node leaves no orphan grid node."""
    _, widget = open_module(gui)
    fixed, moving = load_sample_pair(gui)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume, p.iterations, p.splitTransforms = fixed, moving, 10, True
    run_button(widget, widget.ui.registerButton)
    linear = p.outputTransform
    assert linear.IsA("vtkMRMLLinearTransformNode") and linear.GetParentTransformNode().IsA("vtkMRMLGridTransformNode")
    before = node_ids(scene)
    run_button(widget, widget.ui.registerButton)
    assert node_ids(scene) == before and gui.shown.errors == []
    p.registrationMode = "rigid"
    run_button(widget, widget.ui.registerButton)
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 0 and p.outputTransform is linear
    assert gui.shown.errors == []


def test_segment_runs_in_a_child_and_gives_a_3d_segmentation_on_its_source_volume(gui, scene, tmp_path):
    sys.path.insert(0, str(ROOT / "GVSLTrainer"))
    from conftest import untrained_segmentation_model

    model = untrained_segmentation_model(tmp_path / "seg.pt", spacing=4.0)
    _, widget = open_module(gui)
    _, moving = load_sample_pair(gui)
    p = widget._parameterNode
    p.segmentInputVolume, p.segmentationModel = moving, str(model)
    assert widget.ui.segmentButton.enabled, widget.ui.segmentButton.toolTip
    before = node_ids(scene)
    run_button(widget, widget.ui.segmentButton)
    assert gui.shown.errors == [], widget.ui.logTextEdit.toPlainText()
    node = p.outputSegmentation
    assert node is not None and node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is moving
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    assert {scene.GetNodeByID(i).GetClassName() for i in node_ids(scene) - before} == \
        {"vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"}
    assert " on cpu" in widget.ui.logTextEdit.toPlainText()  # the device the child used
    before = node_ids(scene)
    run_button(widget, widget.ui.segmentButton)  # again: into the same node
    assert node_ids(scene) == before and p.outputSegmentation is node


def test_segment_with_an_atlas_table_instead_of_a_model(gui, scene, tmp_path):
    """*Or atlases*: a CSV of labelled heads (Slicer segmentation files, named segments); the child
    registers and fuses them, and the segments come back with the atlases' names."""
    sys.path.insert(0, str(ROOT / "GVSLTrainer"))
    import synthetic
    from gvsl.labels import LabelSpec
    from gvsl.slicer_segmentation import as_slicer_segmentation

    image = synthetic.mni_at(4.0)
    labels = sitk.Resample(synthetic.tissue_labels(), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    spec = LabelSpec([0, 1, 2], ["background", "grey matter", "white matter"])
    rows = ["image,labels"]
    for i, shift in enumerate((3.0, -3.0)):
        moved = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.05 * (i + 1), (shift, 0.0, 0.0))
        sitk.WriteImage(synthetic.moved_in_space(image, moved), str(tmp_path / f"atlas{i}.nrrd"))
        sitk.WriteImage(as_slicer_segmentation(synthetic.moved_in_space(labels, moved), spec),
                        str(tmp_path / f"atlas{i}.seg.nrrd"))
        rows.append(f"{tmp_path / f'atlas{i}.nrrd'},{tmp_path / f'atlas{i}.seg.nrrd'}")
    (tmp_path / "atlases.csv").write_text("\n".join(rows) + "\n")
    sitk.WriteImage(image, str(tmp_path / "target.nrrd"))
    _, widget = open_module(gui)
    p = widget._parameterNode
    p.segmentInputVolume = load_volume(scene, tmp_path / "target.nrrd", "target")
    p.segmentationModel, p.segmentationAtlases = "/models/gvsl_segmentation.pt", str(tmp_path / "atlases.csv")
    assert not widget.ui.segmentButton.enabled and "not both" in widget.ui.segmentButton.toolTip
    p.segmentationModel = ""
    assert widget.ui.segmentButton.enabled, widget.ui.segmentButton.toolTip
    run_button(widget, widget.ui.segmentButton)
    assert gui.shown.errors == [], widget.ui.logTextEdit.toPlainText()
    segments = p.outputSegmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == \
        ["grey matter", "white matter"]


def test_segment_with_atlases_checked_in_the_scene(gui, scene, tmp_path):
    """*Or scene atlases*: two labelled heads loaded in the scene, their segmentations checked in the panel
    (each made on its volume); the child registers and fuses them, and only the result's nodes appear."""
    sys.path.insert(0, str(ROOT / "GVSLTrainer"))
    import synthetic
    from GVSLLib import conversion

    image = synthetic.mni_at(4.0)
    labels = sitk.Resample(synthetic.tissue_labels(), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(image, str(tmp_path / "target.nrrd"))
    _, widget = open_module(gui)
    p = widget._parameterNode
    p.segmentInputVolume = load_volume(scene, tmp_path / "target.nrrd", "target")
    checks = bound_widgets(widget)["segmentationAtlasNodes"]
    for i, shift in enumerate((3.0, -3.0)):
        moved = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.05 * (i + 1), (shift, 0.0, 0.0))
        sitk.WriteImage(synthetic.moved_in_space(image, moved), str(tmp_path / f"atlas{i}.nrrd"))
        volume = load_volume(scene, tmp_path / f"atlas{i}.nrrd", f"atlas {i}")
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"atlas {i} labels")
        conversion.segmentationFromLabels(synthetic.moved_in_space(labels, moved),
                                          {1: ("grey matter", (0.9, 0.6, 0.5)), 2: ("white matter", (1.0, 1.0, 0.9))},
                                          segmentation)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # as Segment Editor does
        assert not widget.ui.segmentButton.enabled  # one atlas is not enough
        checks.setCheckState(segmentation, standins.Qt.Checked)
    assert widget.ui.segmentButton.enabled, widget.ui.segmentButton.toolTip
    before = node_ids(scene)
    run_button(widget, widget.ui.segmentButton)
    assert gui.shown.errors == [], widget.ui.logTextEdit.toPlainText()
    node = p.outputSegmentation
    segments = node.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == \
        ["grey matter", "white matter"]
    assert node_ids(scene) - before == {node.GetID(), node.GetDisplayNode().GetID()}


def test_rigid_then_deformable_is_not_blocked(gui, scene):
    _, widget = open_module(gui)
    fixed, moving = load_sample_pair(gui)
    p = widget._parameterNode
    rigid = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid result")
    p.fixedVolume, p.movingVolume, p.registrationMode, p.outputTransform = fixed, moving, "rigid", rigid
    assert widget.ui.registerButton.enabled
    bound_widgets(widget)["preset"].currentIndex = bound_widgets(widget)["preset"].findText("Same modality, deformable")
    assert p.registrationMode == "deformable"
    assert widget.ui.registerButton.enabled, widget.ui.registerButton.toolTip
    assert p.outputTransform is None and p.initialTransform is rigid  # a new transform, refining the rigid one
    assert "rigid result is linear" in widget.ui.logTextEdit.toPlainText()


def test_cancel_returns_at_once_and_leaves_the_scene_as_it_was(gui, scene):
    _, widget = open_module(gui)
    fixed, moving = load_sample_pair(gui)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume, p.iterations = fixed, moving, 5000
    p.movingSegmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")  # refused: no segments
    widget.ui.registerButton.click()
    assert widget._job is None and gui.shown.errors and "no segments" in gui.shown.errors[-1]
    scene.RemoveNode(p.movingSegmentation)
    before = node_ids(scene)
    widget.ui.registerButton.click()
    job = widget._job
    deadline = time.monotonic() + 120
    while job.process.fraction == 0 and job.process.poll() is None and time.monotonic() < deadline:
        standins.fireTimers()
        time.sleep(0.1)
    assert job.process.poll() is None, job.process.output  # working when cancelled
    inputs = bound_widgets(widget).values()
    assert not any(w.enabled for w in inputs) and not widget.ui.segmentButton.enabled  # a run's inputs stay put
    assert widget.ui.logTextEdit.lines[0].startswith(job.process.argv[0])  # the live log: the command first
    start = time.monotonic()
    widget.ui.registerButton.click()  # now "Cancel"
    assert time.monotonic() - start < 1.0
    assert widget._job is None and widget.ui.registerButton.text == "Register"
    assert all(w.enabled for w in inputs) and widget.ui.registerButton.enabled
    assert job.process.waitUntilGone(30) and not job.workdir.exists()
    assert node_ids(scene) == before and moving.GetParentTransformNode() is None


def test_a_failed_run_reports_its_error_and_leaves_the_scene_as_it_was(gui, scene, tmp_path):
    _, widget = open_module(gui)
    fixed, moving = load_sample_pair(gui)
    p = widget._parameterNode
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    p.fixedVolume, p.movingVolume, p.registrationModel = fixed, moving, str(broken)
    import SimpleITK as sitk
    from GVSLLib import conversion

    head = sitk.Cast(conversion.imageFromVolumeNode(moving) > 60, sitk.sitkUInt8)
    seg = conversion.segmentationFromLabels(head, {1: ("head", (1.0, 0.5, 0.0))},
                                            scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tissue"))
    p.movingSegmentation = seg  # exported to a label map before the run: Slicer adds a colour table then
    before = node_ids(scene)
    run_button(widget, widget.ui.registerButton)
    assert gui.shown.errors and "broken.pt" in gui.shown.errors[-1]
    assert node_ids(scene) == before  # no colour table, label map or display node left behind
    assert not widget.ui.logCollapsibleButton.collapsed


def test_reload_and_test_passes_without_the_packages_and_runs_the_buttons_path_with_them(gui, scene, monkeypatch):
    _, widget = open_module(gui)
    from GVSLLib import dependencies

    with monkeypatch.context() as m:
        m.setattr(dependencies, "missingPackages", lambda: ["torch"])
        m.setattr(gui.app, "testingEnabled", lambda: False)  # an interactive Slicer: errors are shown
        try:
            widget.onReloadAndTest()
        except BaseException as e:  # unittest.SkipTest too: Reload and Test runs outside a test runner
            pytest.fail(f"Reload and Test raised {type(e).__name__}: {e}")
    assert gui.shown.errors == [] and "not run" in gui.shown.delays[-1]
    widget.onReloadAndTest()  # the whole self-test: Sample Data pair, child process, known transform
    assert gui.shown.errors == [] and gui.shown.delays[-1] == "Test passed"
