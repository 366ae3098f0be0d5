"""The Slicer module's logic on real MRML (pip slicer-core): nodes in, nodes out, checked against the
headless tools' files and against SimpleITK, point by point, on oblique anisotropic anatomy."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GVSLExtension"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GVSLTrainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gvsl.commands import register as register_cli  # noqa: E402
import synthetic  # noqa: E402
from slicer_scene import close_scene, load_volume, new_scene, node_ids  # noqa: E402
from GVSLLib import conversion, dependencies  # noqa: E402
from GVSLLib.logic import GVSLLogic, formatMetrics  # noqa: E402
from gvsl import checkpoint  # noqa: E402
from gvsl.labels import LabelSpec  # noqa: E402
from gvsl.networks import GVSLSegmenter  # noqa: E402
from gvsl.segmentation import segment as headless_segment  # noqa: E402

ITERATIONS = 30  # enough for a real deformation; the comparisons are exact either way
FLIP = np.array([-1.0, -1.0, 1.0])


@pytest.fixture
def scene():
    scene = new_scene()
    yield scene
    close_scene(scene)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict:
    """A real head pair (oblique 2.6x2.4x3.2 mm fixed grid, 1.5 mm moving) with tissue labels, as files."""
    folder = tmp_path_factory.mktemp("pair")
    fixed, moving, _, moving_labels, _ = synthetic.synthetic_pair(seed=3)
    files = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nii.gz",
             "moving_labels": folder / "moving_labels.nii.gz"}
    sitk.WriteImage(fixed, str(files["fixed"]))
    sitk.WriteImage(moving, str(files["moving"]))
    sitk.WriteImage(moving_labels, str(files["moving_labels"]))
    return files


@pytest.fixture(scope="module")
def headless(pair_files, tmp_path_factory) -> Path:
    """register.py's outputs for the pair."""
    out = tmp_path_factory.mktemp("headless")
    assert register_cli.main(["--fixed", str(pair_files["fixed"]), "--moving", str(pair_files["moving"]),
                              "--moving-labels", str(pair_files["moving_labels"]), "--iterations", str(ITERATIONS),
                              "--output-dir", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def pair_nodes(scene, pair_files) -> tuple:
    """(fixed, moving) volume nodes read from the pair's files."""
    return load_volume(scene, pair_files["fixed"], "fixed"), load_volume(scene, pair_files["moving"], "moving")


def load_segmentation(scene, path: Path):
    """A segmentation made from a label map file, at the file's resolution (here 1 mm, finer than its volume)."""
    labelmap = load_volume(scene, path, "labels", labelmap=True)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tissue")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
    scene.RemoveNode(labelmap)
    return seg


def sample_points_ras(image: sitk.Image, n: int = 400, seed: int = 0) -> np.ndarray:
    """Random continuous points inside ``image``'s grid, RAS."""
    rng = np.random.default_rng(seed)
    idx = rng.uniform(0, 1, (n, 3)) * (np.array(image.GetSize()) - 1)
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx]) * FLIP


def map_with_node(node, points_ras: np.ndarray) -> np.ndarray:
    """The fixed -> moving mapping a moving volume under ``node`` gets: world -> node's local space."""
    t = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, node, t)
    return np.array([t.TransformPoint(*p) for p in points_ras])


def map_with_itk(transform: sitk.Transform, points_ras: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint((p * FLIP).tolist()) for p in points_ras]) * FLIP


def node_geometry_lps(node) -> tuple:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    a = np.diag([-1.0, -1.0, 1.0, 1.0]) @ slicer.util.arrayFromVTKMatrix(m)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    return a[:3, 3], spacing, a[:3, :3] / spacing


def assert_same_geometry(node, image: sitk.Image) -> None:
    origin, spacing, direction = node_geometry_lps(node)
    assert node.GetImageData().GetDimensions() == image.GetSize()
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(direction, np.array(image.GetDirection()).reshape(3, 3), atol=1e-6)


def labels_on(seg, reference) -> np.ndarray:
    """A segmentation as a label array on ``reference``'s grid, values = segment order + 1."""
    image, _ = conversion.labelsFromSegmentation(seg, reference)
    assert image.GetSize() == reference.GetImageData().GetDimensions()
    return sitk.GetArrayFromImage(image)


# ---------------------------------------------------------------------------------------------- conversion
def test_volume_node_round_trips_through_simpleitk_in_lps(scene, pair_files):
    node = load_volume(scene, pair_files["fixed"], "fixed")
    reference = sitk.ReadImage(str(pair_files["fixed"]))
    image = conversion.imageFromVolumeNode(node)
    assert_same_geometry(node, reference)
    for a, b in ((image.GetOrigin(), reference.GetOrigin()), (image.GetSpacing(), reference.GetSpacing()),
                 (image.GetDirection(), reference.GetDirection())):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    back = conversion.volumeNodeFromImage(image, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    assert_same_geometry(back, reference)


def test_volume_under_a_linear_transform_converts_where_slicer_shows_it(scene, pair_files):
    node = load_volume(scene, pair_files["fixed"], "fixed")
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = slicer.util.arrayFromVTKMatrix(vtk.vtkMatrix4x4())
    rot = np.array(sitk.VersorTransform((0.3, 0.2, 1.0), 0.4).GetMatrix()).reshape(3, 3)
    to_parent[:3, :3], to_parent[:3, 3] = rot, (10.0, -4.0, 7.0)
    slicer.util.updateTransformMatrixFromArray(parent, to_parent)
    node.SetAndObserveTransformNodeID(parent.GetID())
    image = conversion.imageFromVolumeNode(node)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    for ijk in ((0, 0, 0), (5, 60, 3), (63, 75, 49)):
        ras = to_parent @ slicer.util.arrayFromVTKMatrix(m) @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), ras[:3] * FLIP, atol=1e-4)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    parent.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(conversion.ConversionError, match="fixed: lies under the non-linear transform"):
        conversion.imageFromVolumeNode(node)


# ---------------------------------------------------------------------------------------------- registration
@pytest.fixture
def registered(scene, pair_files, pair_nodes):
    fixed, moving = pair_nodes
    seg = load_segmentation(scene, pair_files["moving_labels"])
    calls = []
    nodes = GVSLLogic(scene).register(fixed, moving, iterations=ITERATIONS, movingSegmentation=seg,
                                      outputVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped"),
                                      progress=lambda stage, f: calls.append(f))
    return fixed, moving, seg, nodes, calls


def test_register_matches_the_headless_tool(registered, headless):
    """In-process registration of nodes = register.py on their files, within run-to-run tolerance
    (the inputs differ by ~1e-14 mm after the RAS round trip, which the optimiser amplifies a little)."""
    fixed, moving, seg, nodes, calls = registered
    assert calls and calls[-1] == pytest.approx(1.0)
    warped = sitk.ReadImage(str(headless / "warped.nii.gz"))
    assert_same_geometry(nodes.outputVolume, warped)
    ours, theirs = slicer.util.arrayFromVolume(nodes.outputVolume), sitk.GetArrayFromImage(warped)
    assert np.percentile(np.abs(ours - theirs), 99.9) < 0.01 * theirs.max()
    points = sample_points_ras(warped)
    expected = map_with_itk(sitk.ReadTransform(str(headless / "transform.h5")), points)
    assert np.abs(expected - points).max() > 2.0  # a real deformation, not the identity
    np.testing.assert_allclose(map_with_node(nodes.transform, points), expected, atol=0.1)
    headless_metrics = json.loads((headless / "metrics.json").read_text())
    assert nodes.metrics["ncc_after"] == pytest.approx(headless_metrics["ncc_after"], abs=2e-3)
    assert json.loads(nodes.transform.GetAttribute("GVSL.metrics"))["ncc_after"] == nodes.metrics["ncc_after"]
    text = formatMetrics(nodes.metrics)
    assert f"{nodes.metrics['ncc_before']} → {nodes.metrics['ncc_after']}" in text and "Folding" in text
    # the propagated segmentation lands where warped_labels.nii.gz does and keeps the segments' names
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(headless / "warped_labels.nii.gz")))
    assert (labels_on(nodes.segmentation, fixed) == theirs).mean() > 0.99 and len(np.unique(theirs)) == 3
    names = [nodes.segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert moving.GetParentTransformNode() is None  # inputs untouched


@pytest.fixture
def loaded(scene, headless, pair_nodes):
    """Nodes built from register.py's files: the conversion alone, to compare exactly."""
    fixed, moving = pair_nodes
    logic = GVSLLogic(scene)
    whole = logic.loadRegistration(headless, fixed, moving, segments={1: ("grey", (1, 0, 0)), 2: ("white", (0, 0, 1))},
                                   outputVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped"))
    split = logic.loadRegistration(headless, fixed, moving, splitTransforms=True)
    return fixed, moving, whole, split, sample_points_ras(sitk.ReadImage(str(headless / "warped.nii.gz")), seed=2)


def test_transform_node_moves_the_moving_volume_onto_the_fixed_one_in_slicer(loaded):
    """Slicer's own resampling of the moving volume under the transform reproduces the output volume."""
    fixed, moving, whole, _, _ = loaded
    moving.SetAndObserveTransformNodeID(whole.transform.GetID())
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    ours, slicers = slicer.util.arrayFromVolume(whole.outputVolume), slicer.util.arrayFromVolume(resampled)
    inside = ours > 1
    assert inside.mean() > 0.3
    assert np.corrcoef(ours[inside], slicers[inside])[0, 1] > 0.99
    assert np.median(np.abs(ours[inside] - slicers[inside])) < 0.02 * ours.max()


def test_loaded_nodes_are_the_headless_files_exactly(loaded, headless):
    fixed, _, whole, _, points = loaded
    warped = sitk.ReadImage(str(headless / "warped.nii.gz"))
    assert_same_geometry(whole.outputVolume, warped)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(whole.outputVolume), sitk.GetArrayFromImage(warped))
    np.testing.assert_allclose(map_with_node(whole.transform, points),
                               map_with_itk(sitk.ReadTransform(str(headless / "transform.h5")), points), atol=1e-3)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(headless / "warped_labels.nii.gz")))
    np.testing.assert_array_equal(labels_on(whole.segmentation, fixed), theirs)
    segments = whole.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(2)] == ["grey", "white"]
    np.testing.assert_allclose(segments.GetNthSegment(1).GetColor(), (0, 0, 1))


def test_without_an_output_volume_the_moving_volume_is_shown_through_the_result(scene, headless, pair_nodes,
                                                                                 pair_files):
    """As SlicerElastix: no resampled copy; the moving volume sits under the result (the top of a split
    pair) and maps world points as transform.h5 does."""
    fixed, moving = pair_nodes
    logic = GVSLLogic(scene)
    points = sample_points_ras(sitk.ReadImage(str(headless / "warped.nii.gz")), seed=3)
    expected = map_with_itk(sitk.ReadTransform(str(headless / "transform.h5")), points)
    for split in (False, True):
        volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems()
        nodes = logic.loadRegistration(headless, fixed, moving, splitTransforms=split)
        assert nodes.outputVolume is None
        assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == volumes
        assert moving.GetParentTransformNode() is nodes.transform
        np.testing.assert_allclose(map_with_node(moving.GetParentTransformNode(), points), expected, atol=1e-3)
    # a next run reads the moving volume as stored, and the deformable result above it is no start
    inputs = logic._registrationInputs(fixed, moving, None, "deformable", None, None, False, None, None, None, None,
                                       None, None)
    stored = sitk.ReadImage(str(pair_files["moving"]))
    np.testing.assert_allclose(inputs.moving.GetOrigin(), stored.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(inputs.moving.GetDirection(), stored.GetDirection(), atol=1e-9)
    assert "initial_transform" not in inputs.extra


def test_split_transforms_compose_to_the_same_mapping(loaded, headless):
    _, _, _, split, points = loaded
    assert split.affineTransform.IsA("vtkMRMLLinearTransformNode")
    assert split.deformableTransform.IsA("vtkMRMLGridTransformNode")
    assert split.affineTransform.GetParentTransformNode() is split.deformableTransform
    assert split.transform is split.affineTransform
    composite = map_with_itk(sitk.ReadTransform(str(headless / "transform.h5")), points)
    np.testing.assert_allclose(map_with_node(split.affineTransform, points), composite, atol=1e-3)
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(headless / "displacement.nii.gz"),
                                                           sitk.sitkVectorFloat64))
    np.testing.assert_allclose(map_with_node(split.deformableTransform, points), map_with_itk(field, points), atol=1e-3)
    linear = split.affineTransform.GetTransformFromParent()
    np.testing.assert_allclose([linear.TransformPoint(*p) for p in points],
                               map_with_itk(sitk.ReadTransform(str(headless / "affine.tfm")), points), atol=1e-3)


def test_a_linear_output_transform_cannot_take_a_deformable_result(loaded, headless, scene):
    fixed, moving, _, split, _ = loaded
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="affine: a linear transform node cannot hold the deformable"):
        GVSLLogic(scene).loadRegistration(headless, fixed, moving, outputTransform=split.affineTransform)
    assert scene.GetNumberOfNodes() == before


def test_a_linear_registration_loads_as_one_linear_node(scene, pair_files, pair_nodes, tmp_path):
    out = tmp_path / "affine"
    assert register_cli.main(["--fixed", str(pair_files["fixed"]), "--moving", str(pair_files["moving"]),
                              "--mode", "affine", "--output-dir", str(out), "--no-progress"]) == 0
    fixed, moving = pair_nodes
    nodes = GVSLLogic(scene).loadRegistration(out, fixed, moving)
    assert nodes.transform.IsA("vtkMRMLLinearTransformNode") and nodes.deformableTransform is None
    headless = sitk.ReadTransform(str(out / "transform.h5"))
    points = np.array([[10.0, -20.0, 15.0], [-30.0, 5.0, 40.0]])  # LPS
    from_parent = nodes.transform.GetTransformFromParent()
    ras = [from_parent.TransformPoint(*(p * FLIP)) for p in points]
    np.testing.assert_allclose(np.array(ras) * FLIP, [headless.TransformPoint(p.tolist()) for p in points], atol=1e-3)
    assert "Run time" in formatMetrics(nodes.metrics)


def test_nodes_convert_to_masks_transforms_and_lps_points(scene, pair_files):
    init = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start")
    ras = np.eye(4)
    ras[:3, :3] = np.array(sitk.Euler3DTransform((0, 0, 0), 0.1, -0.2, 0.3).GetMatrix()).reshape(3, 3)
    ras[:3, 3] = [5.0, -7.0, 9.0]
    init.SetMatrixTransformFromParent(slicer.util.vtkMatrixFromArray(ras))
    itk = conversion.linearTransformFromNode(init)
    points = np.array([[10.0, 20.0, -30.0], [-40.0, 5.0, 12.0]])
    node_mapped = [init.GetTransformFromParent().TransformPoint(*p) for p in points]
    np.testing.assert_allclose(map_with_itk(itk, points), node_mapped, atol=1e-9)
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    for i, p in enumerate(points):
        markups.AddControlPoint(*p, f"F-{i + 1}")
    lps, labels = conversion.pointsFromMarkups(markups)
    np.testing.assert_allclose(lps, points * FLIP)
    assert labels == ["F-1", "F-2"]
    seg = load_segmentation(scene, pair_files["moving_labels"])
    mask = conversion.maskFromNode(seg)
    labels_file = sitk.ReadImage(str(pair_files["moving_labels"]))
    assert sitk.GetArrayViewFromImage(mask).sum() == (sitk.GetArrayViewFromImage(labels_file) > 0).sum()


def test_registration_options_from_nodes_in_and_out_of_process(scene, pair_files, pair_nodes):
    fixed, moving = pair_nodes
    reference = sitk.ReadImage(str(pair_files["fixed"]))
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(
        ((np.array(reference.GetSize()) - 1) / 2).tolist())) * FLIP  # RAS
    fixed_ras = centre + np.random.default_rng(0).uniform(-30, 30, (4, 3))
    moving_ras = fixed_ras + [2.0, -3.0, 1.5]
    lists = []
    for name, points in (("F", fixed_ras), ("M", moving_ras)):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for i, p in enumerate(points):
            node.AddControlPoint(*p, f"{name}-{i + 1}")  # Slicer's default names: paired by their numbers
        lists.append(node)
    init = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start")
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 0.0, -1.0]
    init.SetMatrixTransformFromParent(slicer.util.vtkMatrixFromArray(shift))
    seg = load_segmentation(scene, pair_files["moving_labels"])
    options = dict(mode="affine", iterations=10, fixedLandmarks=lists[0], movingLandmarks=lists[1],
                   initialTransform=init, movingMask=seg, similarity="ncc")
    logic = GVSLLogic(scene)
    nodes = logic.register(fixed, moving, **options)
    m = nodes.metrics
    assert m["mode"] == "affine" and nodes.transform.IsA("vtkMRMLLinearTransformNode")
    assert m["start"]["initial_transform"] and m["masks"]["moving"] == "given" and m["similarity"]["name"] == "ncc"
    np.testing.assert_allclose([m["tre_before"]["points"][f"F-{i}"] for i in range(1, 5)],
                               np.linalg.norm(moving_ras - fixed_ras, axis=1), atol=1e-3)
    # point by point in RAS, from the result node itself: the markups reached gvsl in LPS
    after = np.linalg.norm(map_with_node(nodes.transform, fixed_ras) - moving_ras, axis=1)
    np.testing.assert_allclose([m["tre_after"]["points"][f"F-{i}"] for i in range(1, 5)], after, atol=1e-3)
    assert "Landmark error" in formatMetrics(m)
    job = logic.startRegistration(fixed, moving, **{k: v for k, v in options.items()})
    assert job.process.wait(300) == 0, job.process.output
    background = job.finish()
    for key in ("tre_before", "tre_after"):
        assert background.metrics[key]["mean_mm"] == pytest.approx(m[key]["mean_mm"], abs=0.02), (key, background.metrics[key], m[key])
    with pytest.raises(ValueError, match="both fixed and moving landmarks"):
        logic.register(fixed, moving, fixedLandmarks=lists[0])


def test_inputs_problem_refuses_before_a_run_what_would_fail_after_it(scene, pair_nodes):
    fixed, moving = pair_nodes
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "affine out")
    landmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    problem = GVSLLogic.registrationInputsProblem
    assert "cannot hold a deformable result" in problem(fixed, moving, outputTransform=linear)
    assert problem(fixed, moving, mode="affine", outputTransform=linear) == ""  # a linear result: exactly right
    assert problem(fixed, moving, outputTransform=linear, splitTransforms=True) == ""
    assert "both fixed and moving landmarks" in problem(fixed, moving, fixedLandmarks=landmarks)
    with pytest.raises(ValueError, match="cannot hold a deformable result"):
        GVSLLogic(scene).startRegistration(fixed, moving, outputTransform=linear)


def test_split_runs_into_the_same_node_leave_no_orphan_grid_nodes(scene, headless, pair_nodes):
    fixed, moving = pair_nodes
    logic = GVSLLogic(scene)
    first = logic.loadRegistration(headless, fixed, moving, splitTransforms=True)
    again = logic.loadRegistration(headless, fixed, moving, outputTransform=first.affineTransform,
                                   splitTransforms=True)
    assert again.deformableTransform is first.deformableTransform
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 1


def test_saved_transform_is_read_by_simpleitk_as_the_same_mapping(loaded, headless, tmp_path):
    _, _, whole, _, points = loaded
    storage = whole.transform.GetScene().AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "saved.h5"))
    assert storage.WriteData(whole.transform)
    np.testing.assert_allclose(map_with_itk(sitk.ReadTransform(str(tmp_path / "saved.h5")), points),
                               map_with_itk(sitk.ReadTransform(str(headless / "transform.h5")), points), atol=1e-3)


def test_register_refuses_bad_inputs_and_creates_nothing(scene, pair_files):
    fixed = load_volume(scene, pair_files["fixed"], "fixed")
    logic = GVSLLogic(scene)
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="same node"):
        logic.register(fixed, fixed)
    with pytest.raises(ValueError, match="Select a fixed and a moving"):
        logic.register(fixed, None)
    with pytest.raises(ValueError, match="Model file not found"):
        logic.register(fixed, load_volume(scene, pair_files["moving"], "moving"), model="/nonexistent/model.pt")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(conversion.ConversionError, match="empty: the volume has no image data"):
        logic.register(fixed, empty)
    assert scene.GetNumberOfNodes() == before + 3  # the moving, the empty volume and a storage node
    assert logic.registrationInputsProblem(fixed, fixed) and not logic.registrationInputsProblem(fixed, empty)


# ---------------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def segmentation_model(tmp_path_factory) -> Path:
    """A small segmentation model with original label values, names and colours."""
    torch.manual_seed(1)
    spec = LabelSpec([0, 205, 420], ["background", "grey matter", "white matter"],
                     [(0, 0, 0), (0.9, 0.3, 0.2), (0.2, 0.6, 0.9)])
    model = GVSLSegmenter(spec.num_classes, width=4)
    return checkpoint.save(tmp_path_factory.mktemp("model") / "seg.pt", model, "segmentation", {
        "width": 4, "in_channels": 1, "labels": spec.as_dict(), "normalize": "mr", "spacing": [3.0] * 3,
        "crop": [32, 32, 32]})


def test_segment_gives_named_coloured_segments_in_the_input_geometry(scene, pair_files, segmentation_model):
    volume = load_volume(scene, pair_files["fixed"], "head")
    calls = []
    node = GVSLLogic(scene).segment(volume, str(segmentation_model), progress=lambda stage, f: calls.append(f))
    assert calls[-1] == 1.0 and np.all(np.diff(calls) > 0)  # one call per window batch, none missed
    # the source volume is named (DICOM SEG export needs it) and the segments are shown in 3D
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    headless = headless_segment(sitk.ReadImage(str(pair_files["fixed"])), checkpoint.load(segmentation_model))
    truth = sitk.GetArrayFromImage(headless.labels)
    present = [v for v in (205, 420) if (truth == v).any()]
    assert present, "the model predicts no structure: the test would prove nothing"
    segmentation = node.GetSegmentation()
    segments = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i)
                for i in range(segmentation.GetNumberOfSegments())}
    names = {205: "grey matter", 420: "white matter"}
    assert set(segments) == {names[v] for v in present}
    colours = {205: (0.9, 0.3, 0.2), 420: (0.2, 0.6, 0.9)}
    for v in present:
        np.testing.assert_allclose(segments[names[v]].GetColor(), colours[v], atol=1e-6)
    # exported back on the input grid, segment by segment, it is the headless label map
    ours = labels_on(node, volume)
    order = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    expected = np.zeros_like(truth)
    for i, name in enumerate(order):
        expected[truth == {n: v for v, n in names.items()}[name]] = i + 1
    np.testing.assert_array_equal(ours, expected)


def test_segment_refuses_a_registration_model(scene, pair_files, tmp_path):
    from gvsl.networks import GVSL

    path = checkpoint.save(tmp_path / "pre.pt", GVSL(width=4), "pretrain", {"width": 4})
    volume = load_volume(scene, pair_files["fixed"], "head")
    logic = GVSLLogic(scene)
    before = scene.GetNumberOfNodes()
    with pytest.raises(checkpoint.CheckpointError, match="pre.pt: is a pretrain model"):
        logic.segment(volume, str(path))
    with pytest.raises(ValueError, match="Select a fine-tuned model"):
        logic.segment(volume, "")
    assert scene.GetNumberOfNodes() == before


# ---------------------------------------------------------------------------------------------- background
def test_background_registration_equals_the_in_process_one(scene, pair_files, headless, pair_nodes):
    fixed, moving = pair_nodes
    seg = load_segmentation(scene, pair_files["moving_labels"])
    before = node_ids(scene)
    job = GVSLLogic(scene).startRegistration(fixed, moving, iterations=ITERATIONS, movingSegmentation=seg)
    assert node_ids(scene) == before  # exporting the segments left no label map, colour table or display node
    assert job.process.wait(300) == 0, job.process.output
    assert job.process.fraction == 1.0 and "Registering" in job.process.stage
    nodes = job.finish()
    assert not job.workdir.exists()
    # only the documented results: the transform, the propagated segmentation and its display node
    added = {scene.GetNodeByID(i).GetClassName(): scene.GetNodeByID(i) for i in node_ids(scene) - before}
    assert set(added) == {"vtkMRMLTransformNode", "vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"}
    assert added["vtkMRMLTransformNode"] is nodes.transform and added["vtkMRMLSegmentationNode"] is nodes.segmentation
    assert nodes.segmentation.GetDisplayNode() is added["vtkMRMLSegmentationDisplayNode"]
    points = sample_points_ras(sitk.ReadImage(str(headless / "warped.nii.gz")), seed=4)
    np.testing.assert_allclose(map_with_node(nodes.transform, points),
                               map_with_itk(sitk.ReadTransform(str(headless / "transform.h5")), points), atol=0.05)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(headless / "warped_labels.nii.gz")))
    assert (labels_on(nodes.segmentation, fixed) == theirs).mean() > 0.99


def test_cancel_stops_the_process_and_leaves_the_scene_as_it_was(scene, pair_nodes, pair_files):
    fixed, moving = pair_nodes
    seg = load_segmentation(scene, pair_files["moving_labels"])
    before = node_ids(scene)
    job = GVSLLogic(scene).startRegistration(fixed, moving, iterations=5000, movingSegmentation=seg, movingMask=seg)
    deadline = time.time() + 120
    while job.process.fraction == 0 and time.time() < deadline and job.process.poll() is None:
        time.sleep(0.2)
    assert job.process.poll() is None, job.process.output  # still working when cancelled
    start = time.time()
    job.cancel()
    assert time.time() - start < 1.0  # Slicer's GUI thread does not wait for the process tree to go
    assert job.process.waitUntilGone(30) and job.process.poll() is not None and job.process.cancelled
    assert not job.workdir.exists()
    assert node_ids(scene) == before


CHILD_WITH_GRANDCHILDREN = """
import subprocess, sys, time
same = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
# a grandchild in a session of its own, holding the output pipe: outside the process group
escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("pids", same.pid, escaped.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_live_log_gets_each_output_line_once():
    from GVSLLib.process import BackgroundProcess

    proc = BackgroundProcess([sys.executable, "-c", "print('first'); print('second', flush=True)"])
    assert proc.wait(60) == 0
    assert proc.newLines() == ["first", "second"] and proc.newLines() == []


def test_temporary_files_go_unless_kept(scene, pair_nodes):
    fixed, _ = pair_nodes
    logic = GVSLLogic(scene)
    jobs = {keep: logic._startBackground("gvsl_test_", "register.py", lambda workdir: ["--help"],
                                         lambda folder: folder, keepTemporaryFiles=keep) for keep in (False, True)}
    for keep, job in jobs.items():
        assert job.process.wait(120) == 0
        assert Path(tempfile.gettempdir()) in job.workdir.parents  # no Slicer application: the system's
        job.cleanup()
        assert job.workdir.exists() == keep
    shutil.rmtree(jobs[True].workdir)


def test_cancel_kills_the_whole_process_tree_without_waiting_on_the_pipe():
    """What PythonSlicer.exe (a launcher whose child is the interpreter) needs on Windows, checked here."""
    pytest.importorskip("psutil")
    from GVSLLib.process import BackgroundProcess

    proc = BackgroundProcess([sys.executable, "-c", CHILD_WITH_GRANDCHILDREN])
    deadline = time.time() + 30
    while not any(line.startswith("pids") for line in proc.lines) and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p) for p in next(line for line in proc.lines if line.startswith("pids")).split()[1:]]
    assert all(alive(p) for p in pids)
    start = time.time()
    proc.cancel()
    assert time.time() - start < 1.0  # never stuck on the tree or on the pipe the escaped grandchild held
    assert proc.waitUntilGone(30) and proc._proc.poll() is not None and proc.cancelled
    deadline = time.time() + 5  # the kill is sent at once; a loaded machine may take a moment to deliver it
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_failed_background_run_reports_the_error_and_creates_no_nodes(scene, tmp_path, pair_nodes, pair_files):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    fixed, moving = pair_nodes
    seg = load_segmentation(scene, pair_files["moving_labels"])
    before = node_ids(scene)
    job = GVSLLogic(scene).startRegistration(fixed, moving, model=str(bad), movingSegmentation=seg, fixedMask=seg)
    assert job.process.wait(120) != 0
    with pytest.raises(RuntimeError, match="broken.pt"):
        job.finish()
    assert node_ids(scene) == before and not job.workdir.exists()


def test_background_segmentation(scene, pair_files, segmentation_model, monkeypatch):
    """Slicer's process never loads the model (torch, MONAI and the weights stay in the child): the
    segment names and colours come back from the child with the label map."""
    volume = load_volume(scene, pair_files["fixed"], "head")
    spec = checkpoint.load(segmentation_model).meta["labels"]

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded in Slicer's process")

    monkeypatch.setattr(checkpoint, "load", refuse)
    job = GVSLLogic(scene).startSegmentation(volume, str(segmentation_model))
    assert job.process.wait(300) == 0, job.process.output
    assert job.process.fraction == 1.0  # MONAI's progress bar, read from the child's output
    node = job.finish()
    monkeypatch.undo()
    segments = node.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    assert names == [n for v, n in zip(spec["values"], spec["names"]) if v != 0]
    np.testing.assert_allclose(segments.GetNthSegment(0).GetColor(), spec["colours"][1], atol=1e-6)
    headless = sitk.GetArrayFromImage(headless_segment(sitk.ReadImage(str(pair_files["fixed"])),
                                                       checkpoint.load(segmentation_model)).labels)
    ours = labels_on(node, volume)
    assert ((ours > 0) == (headless > 0)).mean() > 0.999


def test_segment_with_scene_atlases_matches_segments_by_name(scene, tmp_path):
    """Segment with no model: two (volume, segmentation) pairs of the scene, the head moved by known rigid
    motions, whose segmentations list the same structures in opposite orders and colours. The child
    registers and fuses them; the result's segments are matched by name, not by order."""
    target_image = synthetic.mni_at(4.0)
    truth = sitk.GetArrayFromImage(sitk.Resample(synthetic.tissue_labels(), target_image, sitk.Transform(),
                                                 sitk.sitkNearestNeighbor, 0))
    sitk.WriteImage(target_image, str(tmp_path / "target.nrrd"))
    target = load_volume(scene, tmp_path / "target.nrrd", "target")
    names = {1: ("grey matter", (0.9, 0.6, 0.5)), 2: ("white matter", (1.0, 1.0, 0.9))}
    atlases = []
    for i, (angles, shift, order) in enumerate((((4, -3, 2), (3, -2, 4), (1, 2)), ((-3, 5, -2), (-4, 3, -2), (2, 1)))):
        motion = sitk.Euler3DTransform(target_image.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2 for n in target_image.GetSize()]), *np.radians(angles), shift)
        labels = sitk.ChangeLabel(sitk.Resample(synthetic.tissue_labels(), target_image, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0), {1: order[0], 2: order[1]})
        sitk.WriteImage(synthetic.moved_in_space(target_image, motion), str(tmp_path / f"atlas{i}.nrrd"))
        volume = load_volume(scene, tmp_path / f"atlas{i}.nrrd", f"atlas {i}")
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"atlas {i} labels")
        conversion.segmentationFromLabels(synthetic.moved_in_space(labels, motion),
                                          {order[v - 1]: names[v] for v in (1, 2)}, segmentation)
        atlases.append((volume, segmentation))
    before = node_ids(scene)
    job = GVSLLogic(scene).startSegmentation(target, atlases=atlases, device="cpu")
    assert job.process.wait(600) == 0, job.process.output
    node = job.finish()
    segments = node.GetSegmentation()
    found = {segments.GetNthSegment(i).GetName(): i + 1 for i in range(segments.GetNumberOfSegments())}
    assert set(found) == {"grey matter", "white matter"}
    np.testing.assert_allclose(segments.GetSegment(segments.GetSegmentIdBySegmentName("white matter")).GetColor(),
                               names[2][1], atol=1e-6)  # the first atlas's colour
    ours = labels_on(node, target)
    for value, name in ((1, "grey matter"), (2, "white matter")):
        a, b = ours == found[name], truth == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8, name
    assert node_ids(scene) - before == {node.GetID(), node.GetDisplayNode().GetID()}
    assert "Select at least 2 atlases" in GVSLLogic.segmentationInputsProblem(target, None, atlases[:1])


# ---------------------------------------------------------------------------------------------- dependencies
def test_dependencies_never_reinstall_what_slicer_ships():
    assert dependencies.pipRequirements(["numpy", "SimpleITK", "vtk", "monai", "tqdm"]) == ["monai>=1.3", "tqdm"]
    assert dependencies.missingPackages() == []  # this environment has everything


def test_installs_hold_slicers_own_packages_at_their_versions(tmp_path):
    import importlib.metadata

    args = dependencies.pipArguments(["monai>=1.3"], tmp_path / "pins.txt")
    assert args[0] == "monai>=1.3" and args[1:] == ["--constraint", str(tmp_path / "pins.txt")]
    pins = (tmp_path / "pins.txt").read_text().split()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in pins
    assert f"torch=={importlib.metadata.version('torch')}" in pins  # pip never replaces the user's torch


def test_an_old_torch_is_offered_an_upgrade():
    assert dependencies.torchTooOld("2.0.1+cu118") and dependencies.torchTooOld("1.13.1")
    assert not dependencies.torchTooOld("2.1.0") and not dependencies.torchTooOld("2.13.0+cpu")
    assert not dependencies.torchTooOld()  # this environment's torch


# ---------------------------------------------------------------------------------------------- self-test
def test_module_self_test_recovers_the_known_transform(scene, pair_files):
    """What GVSLTest runs inside Slicer: a known oblique affine recovered to well under a voxel."""
    from GVSLLib import selftest

    fixed, moving = selftest.makePair(scene, sitk.ReadImage(str(pair_files["moving"])))
    nodes = GVSLLogic(scene).register(fixed, moving)
    error = selftest.registrationError(nodes.transform, fixed, moving)
    assert np.median(error) < 1.0 and np.percentile(error, 95) < 2.0, (np.median(error), error.max())
    identity = selftest.registrationError(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"), fixed, moving)
    assert np.median(identity) > 5.0  # the test pair does need registering


def test_module_logic_loads_without_torch():
    """Slicer loads the module before PyTorch is installed, and reads a child process's results without
    importing torch into its own process: GVSLLib must need neither torch nor MONAI for that."""
    import subprocess

    code = ("import sys; sys.modules['torch'] = None; sys.modules['monai'] = None; "
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'GVSLExtension')!r}); "
            "import slicer; slicer.mrmlScene = slicer.vtkMRMLScene(); "
            "from GVSLLib.logic import GVSLLogic; from GVSLLib import dependencies, panel, placement, selftest; "
            "logic = GVSLLogic(); print(logic.registrationInputsProblem(None, None)); "
            "from gvsl.registration_io import FILES")  # what loading a child process's results reads
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Select a fixed and a moving volume." in done.stdout
