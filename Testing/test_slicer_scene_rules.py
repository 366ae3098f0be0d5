"""The module's decisions on real MRML (slicer-core): where a registration starts when the moving
volume already sits under a transform, which nodes a run reuses, what the panel enables and keeps
selected, what the dependency check asks, and how Cancel stops a process tree."""
from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GVSLExtension"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from GVSLLib import conversion, dependencies, panel, placement, process, selftest  # noqa: E402
from GVSLLib.logic import GVSLLogic, _RegistrationOutputs  # noqa: E402
from slicer_scene import close_scene, load_volume, new_scene, node_ids  # noqa: E402


@pytest.fixture
def scene():
    scene = new_scene()
    yield scene
    close_scene(scene)


@pytest.fixture
def sample(scene):
    """The module's sample pair as shipped: (fixed, moving) nodes; fixed(x) = moving(T(x)), T known."""
    fixed, moving = (load_volume(scene, path, name) for path, name in
                     zip(selftest.sampleFiles(), selftest.SAMPLE_NODE_NAMES))
    return fixed, moving


def known_transform_node(scene, moving):
    """The self-test's known fixed -> moving transform as a linear node: the moving volume under it is
    already aligned with the fixed one."""
    known = selftest.knownTransformFor(conversion.imageFromVolumeNode(moving, throughParent=False))
    return conversion.linearTransformToNode(known, scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "by hand"))


# ---------------------------------------------------------------------------------------------- the moving volume
def test_a_moving_volume_under_a_linear_transform_starts_there_and_ends_under_the_result(scene, sample):
    """The user placed the moving volume by hand (here: exactly, with the known transform). The run starts
    from that placement, applies it once also when it is chosen as the initial transform too, and the
    result, which replaces it as the parent, shows the moving volume on the fixed one."""
    fixed, moving = sample
    logic = GVSLLogic(scene)
    for chosen in (False, True):
        byHand = known_transform_node(scene, moving)
        moving.SetAndObserveTransformNodeID(byHand.GetID())
        assert np.median(selftest.registrationError(byHand, fixed, moving)) < 0.05  # the placement is the truth
        nodes = logic.register(fixed, moving, mode="affine", iterations=30,
                               initialTransform=byHand if chosen else None)
        assert nodes.metrics["start"]["initial_transform"]
        assert moving.GetParentTransformNode() is nodes.transform
        error = selftest.registrationError(nodes.transform, fixed, moving)
        assert np.median(error) < 1.0 and np.percentile(error, 95) < 2.0, (chosen, np.median(error))


def test_a_moving_volume_under_a_nonlinear_transform_is_refused_before_the_run(scene, sample):
    fixed, moving = sample
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    moving.SetAndObserveTransformNodeID(grid.GetID())
    problem = GVSLLogic.registrationInputsProblem(fixed, moving)
    assert "GVSL sample moving: lies under the non-linear transform 'warp'" in problem and "harden" in problem
    with pytest.raises(ValueError, match="non-linear transform 'warp'"):
        GVSLLogic(scene).startRegistration(fixed, moving)
    grid.SetAttribute(placement.METRICS, "{}")  # an earlier GVSL result: replaced by the next one, from scratch
    assert GVSLLogic.registrationInputsProblem(fixed, moving) == ""
    assert placement.startingTransform(moving) is None
    moving.SetAndObserveTransformNodeID(None)
    fixed.SetAndObserveTransformNodeID(grid.GetID())
    assert "GVSL sample fixed (oblique, moved): lies under the non-linear" in \
        GVSLLogic.registrationInputsProblem(fixed, moving)


def test_an_initial_transform_under_another_transform_acts_as_it_would_on_the_moving_volume(scene):
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "parent")
    child = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "child")
    a, b = np.eye(4), np.eye(4)
    a[:3, 3] = (10.0, 0.0, 0.0)
    b[:3, :3] = np.array(sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.3).GetMatrix()).reshape(3, 3)
    parent.SetMatrixTransformFromParent(slicer.util.vtkMatrixFromArray(a))
    child.SetMatrixTransformFromParent(slicer.util.vtkMatrixFromArray(b))
    child.SetAndObserveTransformNodeID(parent.GetID())
    itk = conversion.linearTransformFromNode(child)
    world = vtk_general(child)
    for ras in ([10.0, -20.0, 5.0], [-3.0, 40.0, 12.0]):
        lps = np.array(ras) * [-1, -1, 1]
        np.testing.assert_allclose(np.array(itk.TransformPoint(lps.tolist())) * [-1, -1, 1],
                                   world.TransformPoint(*ras), atol=1e-9)


def vtk_general(node):
    import vtk

    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, node, transform)
    return transform


# ---------------------------------------------------------------------------------------------- reused nodes
@pytest.fixture(scope="module")
def sample_outputs(tmp_path_factory) -> Path:
    """register.py's files (deformable, with labels) for the sample pair."""
    sys.path.insert(0, str(ROOT / "GVSLTrainer"))
    from gvsl.commands import register as register_cli

    fixed, moving = selftest.sampleFiles()
    folder = tmp_path_factory.mktemp("sample")
    labels = folder / "moving_labels.nrrd"
    head = sitk.ReadImage(str(moving))
    sitk.WriteImage(sitk.Cast(head > 60, sitk.sitkUInt8) + sitk.Cast(head > 110, sitk.sitkUInt8), str(labels))
    out = folder / "out"
    assert register_cli.main(["--fixed", str(fixed), "--moving", str(moving), "--moving-labels", str(labels),
                              "--iterations", "10", "--output-dir", str(out), "--no-progress"]) == 0
    return out


def test_a_propagated_segmentation_is_refilled_names_its_sources_and_leaves_no_scratch_nodes(scene, sample,
                                                                                            sample_outputs):
    fixed, moving = sample
    labels = sitk.ReadImage(str(sample_outputs / "warped_labels.nii.gz"))
    seg = conversion.segmentationFromLabels(sitk.Cast(labels > 0, sitk.sitkUInt8), {1: ("head", (1, 0, 0))},
                                            scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tissue"))
    logic = GVSLLogic(scene)
    segments = {1: ("skin", (1, 0, 0)), 2: ("brain", (0, 0, 1))}
    first = logic._registrationNodes(_RegistrationOutputs.fromFolder(sample_outputs), fixed, moving, None, None,
                                     False, segments, seg)
    seg_node = first.segmentation
    assert seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole()) is fixed
    assert seg_node.GetNodeReference(placement.SOURCE_SEGMENTATION) is seg
    before = node_ids(scene)
    again = logic._registrationNodes(_RegistrationOutputs.fromFolder(sample_outputs), fixed, moving, None,
                                     first.transform, False, segments, seg)
    assert again.segmentation is seg_node and again.transform is first.transform
    assert node_ids(scene) == before
    t = first.transform
    assert t.GetNodeReference(t.GetFixedNodeReferenceRole()) is fixed
    assert t.GetNodeReference(t.GetMovingNodeReferenceRole()) is moving


def test_converting_segments_adds_no_colour_tables_or_display_nodes(scene, sample_outputs):
    labels = sitk.ReadImage(str(sample_outputs / "warped_labels.nii.gz"))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    before = node_ids(scene)
    conversion.segmentationFromLabels(labels, {1: ("a", (1, 0, 0)), 2: ("b", (0, 1, 0))}, seg)
    assert {scene.GetNodeByID(i).GetClassName() for i in node_ids(scene) - before} == {"vtkMRMLSegmentationDisplayNode"}
    before = node_ids(scene)
    for _ in range(3):
        conversion.labelsFromSegmentation(seg)
        conversion.maskFromNode(seg)
    assert node_ids(scene) == before


def test_a_linear_result_into_a_split_pairs_linear_node_leaves_no_orphan_grid(scene, sample, sample_outputs):
    fixed, moving = sample
    logic = GVSLLogic(scene)
    split = logic.loadRegistration(sample_outputs, fixed, moving, splitTransforms=True)
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "also under the grid")
    other.SetAndObserveTransformNodeID(split.deformableTransform.GetID())
    outputs = _RegistrationOutputs.fromFolder(sample_outputs)
    outputs.displacement = None  # what a rigid or affine run returns
    logic._registrationNodes(outputs, fixed, moving, None, split.affineTransform, False, {})
    assert split.affineTransform.GetParentTransformNode() is None
    assert scene.GetNodeByID(split.deformableTransform.GetID()) is not None  # still used by another node
    grids = scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode")
    split = logic.loadRegistration(sample_outputs, fixed, moving, outputTransform=split.affineTransform,
                                   splitTransforms=True)
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == grids + 1
    logic._registrationNodes(outputs, fixed, moving, None, split.affineTransform, False, {})
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == grids  # its grid part went with it


def test_an_output_volume_on_the_fixed_grid_is_placed_in_world_and_never_an_input(scene, sample, sample_outputs):
    fixed, moving = sample
    assert "would overwrite an input" in GVSLLogic.registrationInputsProblem(fixed, moving, outputVolume=fixed)
    assert "would overwrite an input" in GVSLLogic.registrationInputsProblem(fixed, moving, outputVolume=moving)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    output.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "stray").GetID())
    nodes = GVSLLogic(scene).loadRegistration(sample_outputs, fixed, moving, outputVolume=output)
    assert output.GetParentTransformNode() is None and moving.GetParentTransformNode() is None
    assert nodes.outputVolume is output


# ---------------------------------------------------------------------------------------------- the panel
def parameters(**values):
    """The parameter node's fields, as the widget has them."""
    fields = dict(fixedVolume=None, movingVolume=None, registrationModel="", iterations=100, device="auto",
                  outputVolume=None, outputTransform=None, splitTransforms=False, movingSegmentation=None,
                  preset="Custom", registrationMode="deformable", similarity="auto", fixedMask=None,
                  movingMask=None, initialTransform=None, fixedLandmarks=None, movingLandmarks=None,
                  segmentInputVolume=None, segmentationModel="", segmentationAtlases="", segmentationAtlasNodes=[],
                  outputSegmentation=None, keepTemporaryFiles=False)
    fields.update(values)
    return types.SimpleNamespace(**fields)


def test_the_panel_passes_every_setting_to_the_logic():
    p = parameters(registrationModel=".", segmentationModel=" /m.pt ")
    assert set(panel.registrationArguments(p)) == set(inspect.signature(GVSLLogic.startRegistration).parameters) - {"self"}
    assert set(panel.segmentationArguments(p)) == set(inspect.signature(GVSLLogic.startSegmentation).parameters) - {"self"}
    assert panel.registrationArguments(p)["model"] is None and panel.segmentationArguments(p)["model"] == "/m.pt"
    assert panel.segmentationArguments(p)["atlases"] is None  # an empty field is no atlases


def test_a_linear_output_with_a_deformable_mode_goes_to_a_new_transform_starting_from_it(scene, sample):
    fixed, moving = sample
    rigid = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid result")
    p = parameters(fixedVolume=fixed, movingVolume=moving, registrationMode="rigid", outputTransform=rigid)
    assert panel.follow(p, "Custom") == ("Rigid head", "") and p.outputTransform is rigid
    p.registrationMode = "deformable"
    shown, message = panel.follow(p, p.preset)
    assert p.outputTransform is None and p.initialTransform is rigid and "starting from rigid result" in message
    assert panel.buttonStates(p)["register"] == (True, panel.REGISTER_TIP)
    # split transforms can hold a deformable result in a linear node: nothing changes
    p = parameters(fixedVolume=fixed, movingVolume=moving, outputTransform=rigid, splitTransforms=True)
    assert panel.fitOutputToMode(p) == "" and p.outputTransform is rigid
    # a chosen initial transform stays
    start = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start")
    p = parameters(fixedVolume=fixed, movingVolume=moving, outputTransform=rigid, initialTransform=start)
    panel.fitOutputToMode(p)
    assert p.outputTransform is None and p.initialTransform is start


def test_after_a_run_the_panel_keeps_the_result_transform_selected_split_or_not(scene):
    for top in (scene.AddNewNodeByClass("vtkMRMLTransformNode"), scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")):
        p = parameters()
        panel.keepResults(p, types.SimpleNamespace(transform=top, outputVolume=None))
        assert p.outputTransform is top and p.outputVolume is None


def test_the_buttons_say_why_they_are_disabled(scene, sample):
    fixed, moving = sample
    states = panel.buttonStates(parameters(fixedVolume=fixed))
    assert states["register"] == (False, "Select a fixed and a moving volume.")
    assert states["segment"] == (False, "Select a volume to segment.")
    states = panel.buttonStates(parameters(fixedVolume=fixed, movingVolume=moving, outputVolume=fixed,
                                           segmentInputVolume=fixed, segmentationModel="/nowhere.pt"))
    assert not states["register"][0] and "would overwrite an input" in states["register"][1]
    assert states["segment"] == (False, "Model file not found: /nowhere.pt")
    states = panel.buttonStates(parameters(segmentInputVolume=fixed, segmentationModel="/m.pt",
                                           segmentationAtlases="/atlases.csv"))
    assert states["segment"] == (False, "Choose a model or atlases, not both.")
    states = panel.buttonStates(parameters(segmentInputVolume=fixed, segmentationAtlases=" /nowhere.csv "))
    assert states["segment"] == (False, "Atlas table not found: /nowhere.csv")


def test_scene_atlases_are_checked_segmentations_on_their_source_volumes(scene, sample):
    """*Or scene atlases*: each checked segmentation with the volume it was made on (the reference Segment
    Editor sets); one without, a single one, or a CSV as well are refused with the reason."""
    fixed, moving = sample
    segmentations = []
    for volume in (fixed, moving):
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} labels")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation.GetSegmentation().AddEmptySegment("brain")
        segmentations.append(segmentation)
    p = parameters(segmentInputVolume=fixed, segmentationAtlasNodes=segmentations)
    assert panel.segmentationArguments(p)["atlases"] == [(fixed, segmentations[0]), (moving, segmentations[1])]
    assert panel.buttonStates(p)["segment"] == (True, panel.SEGMENT_TIP)
    assert "at least 2 atlases" in panel.buttonStates(parameters(segmentInputVolume=fixed,
                                                                 segmentationAtlasNodes=segmentations[:1]))["segment"][1]
    assert panel.buttonStates(parameters(segmentInputVolume=fixed, segmentationAtlasNodes=segmentations,
                                         segmentationAtlases="/a.csv"))["segment"] == \
        (False, "Choose atlases from the scene or a CSV, not both.")
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn freehand")  # no source volume
    drawn.GetSegmentation().AddEmptySegment("brain")
    state = panel.buttonStates(parameters(segmentInputVolume=fixed, segmentationAtlasNodes=[*segmentations, drawn]))
    assert not state["segment"][0] and "drawn freehand has no source volume" in state["segment"][1]


# ---------------------------------------------------------------------------------------------- dependencies
def test_missing_packages_are_installed_after_one_question(monkeypatch):
    calls = []
    pytorch_utils = types.ModuleType("PyTorchUtils")

    class Logic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=None):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            return object()

    pytorch_utils.PyTorchUtilsLogic = Logic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: calls.append(("pip", args)), raising=False)
    plans = iter([("install", ["monai>=1.3", "tqdm"]), (None, [])])
    monkeypatch.setattr(dependencies, "installPlan", lambda: next(plans))
    questions = []
    assert dependencies.ensureDependencies(lambda text: questions.append(text) or True, restart=pytest.fail)
    assert len(questions) == 1 and "PyTorch >=2.1" in questions[0] and "monai>=1.3" in questions[0]
    assert calls[0] == ("torch", False, ">=2.1") and calls[1][0] == "pip" and calls[1][1][:2] == ["monai>=1.3", "tqdm"]
    # declined: nothing is installed
    calls.clear()
    monkeypatch.setattr(dependencies, "installPlan", lambda: ("install", ["tqdm"]))
    assert not dependencies.ensureDependencies(lambda text: False, restart=pytest.fail) and calls == []


def test_an_old_torch_already_loaded_asks_for_a_restart_instead_of_an_upgrade(monkeypatch):
    monkeypatch.setattr(dependencies, "installPlan", lambda: ("upgrade", []))
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    told = []
    assert not dependencies.ensureDependencies(pytest.fail, restart=told.append)
    assert len(told) == 1 and "already loaded in Slicer" in told[0] and "Restart Slicer" in told[0]


# ---------------------------------------------------------------------------------------------- cancel on Windows
def test_cancel_on_windows_without_psutil_kills_the_tree_in_a_hidden_window(monkeypatch):
    proc = process.BackgroundProcess([sys.executable, "-c", "import time; time.sleep(60)"])
    started = []
    monkeypatch.setitem(sys.modules, "psutil", None)  # Slicer ships no psutil
    monkeypatch.setattr(process, "os", types.SimpleNamespace(name="nt"))
    monkeypatch.setattr(process.subprocess, "Popen", lambda argv, **kw: started.append((argv, kw)))
    proc._killTree()
    monkeypatch.undo()
    (argv, kw), = started
    assert argv[:4] == ["taskkill", "/T", "/F", "/PID"] and argv[4] == str(proc._proc.pid)
    assert kw["creationflags"] & 0x08000000  # CREATE_NO_WINDOW: no console flashes up
    proc.cancel()
    assert proc.waitUntilGone(30)
