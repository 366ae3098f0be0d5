"""The registrations users bring every day: CT <-> MR, masks, rigid and affine modes, starting transforms
far away, landmarks; each checked against transforms made with SimpleITK alone."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl.registration import RegistrationOptions, register

import synthetic

SCRIPT = Path(__file__).resolve().parents[1] / "GVSLTrainer" / "register.py"


def brain_epe(transform, truth, fixed) -> np.ndarray:
    err = np.linalg.norm(synthetic.transform_field(transform, fixed) - synthetic.transform_field(truth, fixed), axis=-1)
    arr = sitk.GetArrayFromImage(fixed)
    return err[arr > 0.15 * arr.max()]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--no-progress"], capture_output=True,
                          text=True, timeout=timeout)


def test_ct_to_mr_pair_is_recognised_and_registered():
    fixed, moving, fixed_labels, moving_labels, truth = synthetic.multimodal_pair(seed=0)
    res = register(fixed, moving, fixed_labels, moving_labels)
    m = res.metrics
    assert m["similarity"]["name"] == "mind" and "Hounsfield" in m["similarity"]["reason"]
    assert m["normalize"] == {"fixed": "mr", "moving": "ct"}
    assert m["masks"]["fixed"] == "the fixed image's foreground (multi-modal)"
    assert m["similarity"]["after"] < m["similarity"]["before"]  # MIND: a distance
    epe = brain_epe(res.transform, truth, fixed)
    assert epe.mean() < 1.5, epe.mean()
    assert m["dice_after"]["2"] > 0.94 and m["dice_after"]["1"] > 0.65, m["dice_after"]
    assert m["folding_percent"] < 0.1
    assert m["warnings"] == []  # a good CT<->MR result raises no doubt


def test_auto_keeps_local_ncc_for_the_same_modality():
    fixed, moving, *_ = synthetic.synthetic_pair(seed=1)
    from gvsl.similarity import choose
    from gvsl.volumes import normalise
    f, m = (normalise(sitk.GetArrayFromImage(x), "mr") for x in (fixed, moving))
    assert choose(("mr", "mr"), f, m)[0] == "ncc"
    inverted = np.where(m > 0.05, 1.05 - m, 0)  # a T2-like contrast of the same head
    name, reason = choose(("mr", "mr"), f, inverted)
    assert name == "mind" and "histograms differ" in reason


def test_rounding_noise_in_the_geometry_does_not_move_the_result():
    """A file round trip changes origins and spacings in their last bits (Slicer's RAS conversion: ~1e-14
    mm). The result must not change with them: nearly flat NCC windows once turned such noise into
    0.03-0.1 mm at the 99th percentile of points (0.14-0.2 mm at worst), now 0.002 mm (0.01 at worst)."""
    fixed, moving, *_ = synthetic.synthetic_pair(seed=3)
    nudged = sitk.Image(fixed)
    nudged.SetOrigin([o + 1e-13 for o in fixed.GetOrigin()])
    nudged.SetSpacing([float(np.nextafter(s, np.inf)) for s in fixed.GetSpacing()])
    opts = RegistrationOptions(iterations=30)
    a, b = (register(f, moving, options=opts).transform for f in (fixed, nudged))
    points = [fixed.TransformContinuousIndexToPhysicalPoint(p.tolist())
              for p in np.random.default_rng(0).uniform(0, 1, (2000, 3)) * (np.array(fixed.GetSize()) - 1)]
    moved = np.array([np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))) for p in points])
    assert np.percentile(moved, 99) < 0.01 and moved.max() < 0.5


def write_markups_json(path, points, system="LPS"):
    sign = np.array([-1, -1, 1]) if system == "RAS" else np.ones(3)
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                      "Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                        "controlPoints": [{"id": str(i + 1), "label": f"F-{i + 1}", "position": (p * sign).tolist(),
                                           "positionStatus": "defined"} for i, p in enumerate(points)]}]}
    path.write_text(json.dumps(doc))
    return path


def write_fcsv(path, points, system="RAS"):
    sign = np.array([-1, -1, 1]) if system == "RAS" else np.ones(3)
    rows = [f"vtkMRMLMarkupsFiducialNode_{i},{x},{y},{z},0,0,0,1,1,1,0,M-{i + 1},,"
            for i, (x, y, z) in enumerate(points * sign)]
    path.write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = " + system + "\n"
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" + "\n".join(rows) + "\n")
    return path


def test_rigid_mode_recovers_a_rigid_motion_on_landmarks(tmp_path):
    fixed, moving, truth, fixed_points, moving_points = synthetic.rigid_case()
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz"}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    fl = write_markups_json(tmp_path / "F.mrk.json", fixed_points, "LPS")
    ml = write_fcsv(tmp_path / "M.fcsv", moving_points, "RAS")
    out = tmp_path / "out"
    res = run_cli("--fixed", paths["fixed"], "--moving", paths["moving"], "--mode", "rigid", "--fixed-landmarks", fl,
                  "--moving-landmarks", ml, "--output-dir", out)
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "rigid" and m["tre_before"]["mean_mm"] > 5
    assert m["tre_after"]["mean_mm"] < 0.5 and m["tre_after"]["max_mm"] < 1.0, m["tre_after"]
    assert m["warnings"] == [] and "WARNING" not in res.stdout
    assert set(m["tre_after"]["points"]) == {f"F-{i}" for i in range(1, 7)}
    assert not (out / "displacement.nii.gz").exists() and "no displacement field" in res.stdout
    transform = sitk.ReadTransform(str(out / "transform.h5")).Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        assert transform.GetNumberOfTransforms() == 1
        transform = transform.GetNthTransform(0).Downcast()
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-6)  # exactly rigid
    assert np.linalg.det(matrix) > 0
    # the same points, independently: SimpleITK maps the fixed landmarks onto the moving ones
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in fixed_points])
    assert np.linalg.norm(mapped - moving_points, axis=1).max() < 1.0
    assert (out / "report.png").stat().st_size > 10_000


def test_affine_mode_returns_one_linear_transform():
    fixed, moving, truth, _, _ = synthetic.rigid_case(seed=1)
    res = register(fixed, moving, options=RegistrationOptions(mode="affine"))
    assert res.displacement is None and isinstance(res.transform, sitk.AffineTransform)
    assert np.abs(np.array(sitk.GetArrayViewFromImage(res.jacobian)) - 1).max() < 0.05  # volume kept
    assert brain_epe(res.transform, truth, fixed).mean() < 0.6


def test_linear_modes_reach_a_hundredth_of_a_voxel():
    """The last level on the original images (SimpleITK's correlation): rigid 0.067 -> under 0.03 mm,
    affine 0.15 -> under 0.06 mm on the oblique 2 mm grid, checked point by point against the truth."""
    fixed, moving, truth, _, _ = synthetic.rigid_case(seed=1)
    rigid = register(fixed, moving, options=RegistrationOptions(mode="rigid"))
    assert brain_epe(rigid.transform, truth, fixed).mean() < 0.03
    fixed, moving, _, _, truth = synthetic.affine_case(seed=1)
    affine = register(fixed, moving, options=RegistrationOptions(mode="affine"))
    assert brain_epe(affine.transform, truth, fixed).mean() < 0.06
    assert affine.metrics["polish"]["kept"] and affine.metrics["warnings"] == []


def test_a_polish_that_runs_far_from_the_result_is_refused():
    """From a start 5 mm off, the correlation's optimum lies 5 mm away: more than a polish may move, so
    the start is kept and the metrics say so (the quality warning ``polish_disagrees``)."""
    from gvsl.registration.polish import MOST_MM, polish

    fixed, moving, truth, _, _ = synthetic.rigid_case(seed=1)
    start = np.eye(4)
    start[:3, :3] = np.array(truth.GetMatrix()).reshape(3, 3)
    start[:3, 3] = np.array(truth.TransformPoint((0.0, 0.0, 0.0))) + [5.0, 0.0, 0.0]
    arr = sitk.GetArrayFromImage(fixed)
    points = np.array([fixed.TransformIndexToPhysicalPoint(tuple(int(v) for v in i[::-1]))
                       for i in np.argwhere(arr > 0.15 * arr.max())[::50]])
    kept, info = polish(fixed, moving, start, True, points)
    assert not info["kept"] and info["moved_mm"] > MOST_MM, info
    np.testing.assert_array_equal(kept, start)
    # ITK fails (an empty fixed mask: no sample to compare): the result stands, the reason is recorded
    empty = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(fixed)
    kept, info = polish(fixed, moving, start, True, points, empty)
    assert not info["kept"] and info["moved_mm"] is None and "points" in info["error"], info
    np.testing.assert_array_equal(kept, start)


@pytest.mark.parametrize("angles_deg, search_needed", [((36, -22, 26), False), ((60, -35, 40), True)])
def test_a_start_45_degrees_and_60_mm_away_converges(angles_deg, search_needed):
    fixed, moving, truth, _, _ = synthetic.rigid_case(seed=2)
    centre = moving.TransformContinuousIndexToPhysicalPoint(((np.array(moving.GetSize()) - 1) / 2).tolist())
    far = sitk.Euler3DTransform(centre, *np.radians(angles_deg), (35, -40, 30))
    angle = np.degrees(np.arccos((np.trace(np.array(far.GetMatrix()).reshape(3, 3)) - 1) / 2))
    assert angle > 45 and np.linalg.norm(far.GetTranslation()) > 60
    moved = synthetic.moved_in_space(moving, far)
    target = sitk.CompositeTransform([far.GetInverse(), truth])  # truth first, then into the moved pose
    res = register(fixed, moved, options=RegistrationOptions(mode="rigid"))
    assert brain_epe(res.transform, target, fixed).mean() < 1.0
    if search_needed:  # about 70 degrees: the search finds the way, plain refinement does not
        assert res.metrics["start"]["rotation_search"]["taken"] == "a searched orientation"
        plain = register(fixed, moved, options=RegistrationOptions(mode="rigid", rotation_search=False))
        assert brain_epe(plain.transform, target, fixed).mean() > 3.0


def bright_artefact(moving):
    arr = sitk.GetArrayFromImage(moving)
    zz, yy, xx = np.indices(arr.shape)
    c = np.array(arr.shape) // 2 + np.array([10, 25, 20])
    ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 14 ** 2
    spoiled = arr.copy()
    spoiled[ball] = 3 * arr.max()
    image, mask = sitk.GetImageFromArray(spoiled), sitk.GetImageFromArray((~ball).astype(np.uint8))
    image.CopyInformation(moving)
    mask.CopyInformation(moving)
    return image, mask


def test_a_mask_keeps_a_bright_artefact_out_of_the_match():
    fixed, moving, fixed_labels, moving_labels, _ = synthetic.synthetic_pair(seed=0)
    spoiled, mask = bright_artefact(moving)
    clean = register(fixed, moving, fixed_labels, moving_labels).metrics["dice_after"]["1"]
    unmasked = register(fixed, spoiled, fixed_labels, moving_labels).metrics["dice_after"]["1"]
    masked = register(fixed, spoiled, fixed_labels, moving_labels, moving_mask=mask)
    assert unmasked < clean - 0.03, (clean, unmasked)
    assert masked.metrics["dice_after"]["1"] > unmasked + 0.03, (unmasked, masked.metrics["dice_after"]["1"])
    assert masked.metrics["masks"]["moving"] == "given" and masked.metrics["similarity"]["name"] == "ncc"


def test_an_initial_transform_is_applied_first():
    fixed, moving, truth, _, _ = synthetic.rigid_case(seed=3)
    shifted = sitk.Image(moving)
    shifted.SetOrigin((np.array(moving.GetOrigin()) + 150).tolist())  # the file puts it 150 mm away
    start = sitk.TranslationTransform(3, (150.0, 150.0, 150.0))  # the user's rough fixed -> moving start
    with pytest.raises(ValueError, match="does not overlap"):  # trusting the positions alone fails
        register(fixed, shifted, options=RegistrationOptions(mode="rigid", initialisation="none"))
    res = register(fixed, shifted, initial_transform=start, options=RegistrationOptions(mode="rigid"))
    assert res.metrics["start"]["initial_transform"] and res.metrics["start"]["centring"] == "none"
    target = sitk.CompositeTransform([start, truth])  # truth first, then the start's shift
    assert brain_epe(res.transform, target, fixed).mean() < 0.5


def load_register_script():
    """The command behind ``GVSLTrainer/register.py``."""
    from gvsl.commands import register

    return register


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, anatomical_path):
    tmp = tmp_path_factory.mktemp("bad_registration_inputs")
    head = sitk.ReadImage(str(anatomical_path))
    empty = sitk.Image(head.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(head)
    sitk.WriteImage(empty, str(tmp / "empty_mask.nii.gz"))
    away = sitk.Image(empty) + 1
    away.SetOrigin((500.0, 500.0, 500.0))
    sitk.WriteImage(away, str(tmp / "far_mask.nrrd"))
    (tmp / "three.csv").write_text("1,2,3\n4,5,6\n7,8,9\n")
    (tmp / "two.csv").write_text("1,2,3\n4,5,6\n")
    markups(tmp / "xyz.mrk.json", "XYZ")
    sitk.WriteTransform(sitk.Euler2DTransform(), str(tmp / "flat.tfm"))
    (tmp / "garbage.h5").write_bytes(b"not an hdf5 transform at all")
    for name in ("cut.nii.gz", "cut.nii"):  # half of a real file's bytes: SimpleITK alone reads it, zero-filled
        sitk.WriteImage(head, str(tmp / ("whole" + name[3:])))
        data = (tmp / ("whole" + name[3:])).read_bytes()
        (tmp / name).write_bytes(data[:len(data) // 2])
    elsewhere = sitk.Cast(head > float(np.percentile(sitk.GetArrayViewFromImage(head), 60)), sitk.sitkUInt8)
    elsewhere.SetOrigin(tuple(o + 400.0 for o in head.GetOrigin()))  # a label map of some other region
    sitk.WriteImage(elsewhere, str(tmp / "elsewhere.nrrd"))
    finer = sitk.Resample(sitk.Cast(head > float(np.percentile(sitk.GetArrayViewFromImage(head), 60)), sitk.sitkUInt8),
                          [s * 2 for s in head.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor, head.GetOrigin(),
                          [s / 2 for s in head.GetSpacing()], head.GetDirection())
    sitk.WriteImage(finer, str(tmp / "finer.nrrd"))  # the same region on a finer grid: accepted
    nan = sitk.GetArrayFromImage(sitk.Cast(head, sitk.sitkFloat32))
    nan[3, 4, 5] = np.nan  # SimpleITK alone reads a NIfTI NaN as 0
    nan_image = sitk.GetImageFromArray(nan)
    nan_image.CopyInformation(head)
    sitk.WriteImage(nan_image, str(tmp / "nan.nii.gz"))
    half = sitk.Image(head.GetSize(), sitk.sitkFloat32)
    half.CopyInformation(head)
    half[2, 3, 4] = 1.5  # a float label map whose values are not all integers
    sitk.WriteImage(half, str(tmp / "half.nii.gz"))
    sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)),
                        str(tmp / "field.h5"))
    cut = (tmp / "field.h5").read_bytes()
    (tmp / "cut.h5").write_bytes(cut[:len(cut) // 2])  # an HDF5 file cut short
    sitk.WriteTransform(sitk.AffineTransform((-1.0, 0, 0, 0, 1, 0, 0, 0, 1), (0.0, 0, 0)), str(tmp / "mirror.tfm"))
    (tmp / "flat.mrk.json").write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                                                                "controlPoints": [{"label": "1", "position": [1, 2]}]}]}))
    for value, name in ((0.7, "soft_mask.nii.gz"), (-1.0, "negative_mask.nii.gz")):  # non-zero means use
        mask = sitk.Cast(head > float(np.percentile(sitk.GetArrayViewFromImage(head), 60)), sitk.sitkFloat32) * value
        sitk.WriteImage(mask, str(tmp / name))
    corner, other = (sitk.Image(head.GetSize(), sitk.sitkUInt8) for _ in range(2))
    for image, box in ((corner, (slice(0, 6),) * 3), (other, (slice(-6, None),) * 3)):
        array = sitk.GetArrayFromImage(image)
        array[box] = 1
        written = sitk.GetImageFromArray(array)
        written.CopyInformation(head)
        sitk.WriteImage(written, str(tmp / ("corner.nrrd" if image is corner else "far_corner.nrrd")))
    sitk.WriteImage(sitk.Cast(head, sitk.sitkFloat32), str(tmp / "whole.mha"))
    whole = (tmp / "whole.mha").read_bytes()
    (tmp / "cut.mha").write_bytes(whole[:len(whole) // 2])
    skewed = sitk.Image(head)
    direction = np.array(head.GetDirection()).reshape(3, 3)
    direction[0, 1] = 0.05  # axes 3 degrees from perpendicular
    skewed.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(skewed, str(tmp / "skewed.nrrd"))
    return tmp, anatomical_path


def markups(path, system):
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": [
        {"label": "1", "position": [1, 2, 3]}]}]}))


@pytest.mark.parametrize("extra, expected", [
    (["--fixed-mask", "empty_mask.nii.gz"], "empty_mask.nii.gz: this mask has no voxels"),
    (["--moving-mask", "far_mask.nrrd"], "far_mask.nrrd: this mask lies outside its image"),
    (["--fixed-landmarks", "three.csv", "--moving-landmarks", "two.csv"], "three.csv holds 3 landmarks but"),
    (["--fixed-landmarks", "xyz.mrk.json", "--moving-landmarks", "two.csv"],
     "xyz.mrk.json: unknown coordinate system 'XYZ'"),
    (["--initial-transform", "flat.tfm"], "flat.tfm: it is 2D; a 3D transform is needed"),
    (["--initial-transform", "garbage.h5"], "garbage.h5: cannot be read as an ITK transform"),
    (["--initial-transform", "field.h5"], "field.h5: it is not linear"),
    (["--similarity", "cosine"], "invalid choice: 'cosine'"),
    (["--mode", "elastic"], "invalid choice: 'elastic'"),
    (["--iterations", "0"], "must be a positive integer, got 0"),
    (["--iterations", "-5"], "must be a positive integer, got -5"),
    (["--spacing", "0"], "must be a positive number, got 0"),
    (["--spacing", "-2"], "must be a positive number, got -2"),
    (["--fixed-labels", "half.nii.gz"], "half.nii.gz: a label map needs integer values; 1 voxels are not (e.g. 1.5)"),
    (["--moving-labels", "cut.nii.gz"], "cut.nii.gz: is truncated or damaged: its header promises"),
    (["--fixed-labels", "elsewhere.nrrd"], "elsewhere.nrrd: its labels lie outside its image"),
    (["--fixed-mask", "cut.nii"], "cut.nii: is truncated: its header promises"),
    (["--moving", "nan.nii.gz"], "nan.nii.gz: 1 of its 33825 voxels is NaN or infinite"),
    (["--initial-transform", "mirror.tfm", "--mode", "rigid"], "mirror.tfm: it reflects space (a mirror image"),
    (["--initial-transform", "cut.h5"], "cut.h5: cannot be read as an ITK transform (its HDF5 file is damaged or "
                                        "truncated"),
    (["--fixed-landmarks", "flat.mrk.json", "--moving-landmarks", "two.csv"],
     "flat.mrk.json: control point '1' has position [1, 2]; a point needs 3 coordinates"),
    (["--fixed-mask", "corner.nrrd", "--moving-mask", "far_corner.nrrd"],
     "fixed mask: {folder}/corner.nrrd; moving mask: {folder}/far_corner.nrrd"),
    (["--moving", "cut.mha"], "cut.mha: is truncated: its header promises 135300 bytes of data"),
    (["--fixed", "skewed.nrrd"], "skewed.nrrd: has axes that are not perpendicular (its direction matrix is off by "
                                 "about 2.9 degrees)"),
])
def test_bad_registration_inputs_get_one_clear_error_and_no_output(bad_inputs, capfd, extra, expected):
    folder, head = bad_inputs
    out = folder / "out"
    argv = ["--fixed", str(head), "--moving", str(head), "--output-dir", str(out), "--no-progress",
            *[str(folder / a) if (folder / a).exists() else a for a in extra]]
    script = load_register_script()
    try:
        code = script.main(argv)
    except SystemExit as e:  # argparse refuses unknown names itself
        code = e.code
    err = capfd.readouterr().err  # the file descriptor: ITK's, HDF5's and MetaImage's own lines count too
    assert code == 2 and expected.format(folder=folder) in err, err
    assert "Traceback" not in err
    assert err.startswith("usage:") or len(err.strip().splitlines()) == 1, err  # argparse's usage, or one line
    assert not out.exists() and not list(folder.glob(".out.partial-*"))



def test_the_search_refines_no_candidate_when_the_refined_start_is_best():
    """Candidates must beat the start as refined, not the unrefined orientation: a moving image turned
    20 degrees is recovered by the start's refinement, and no 30-degree grid point is worth refining."""
    import torch
    from gvsl import similarity, spatial
    from gvsl.registration import linear
    from gvsl.registration.pyramid import Pyramid

    fixed, _, _, _, _ = synthetic.rigid_case(seed=0)
    f = torch.from_numpy(sitk.GetArrayFromImage(fixed)).float()[None, None]
    f = f / f.max()
    turn = spatial.affine_from_parameters(torch.tensor([[0.0, 0.0, 0.35]]), torch.ones(1, 3), torch.zeros(1, 3),
                                          torch.zeros(1, 6))
    moving = spatial.warp(f, turn)
    pyramid, sim = Pyramid(f, moving), similarity.make("ncc", 5)
    centre = (torch.tensor(f.shape[2:][::-1], dtype=torch.float32) - 1) / 2
    start = linear.LinearParameters(centre, centre, float(centre.max()))
    params, info = linear.search(pyramid, sim, spatial.identity_matrix(1), start, 4, 50, 0.01, 1e-5, 20)
    assert abs(abs(info["taken_deg"][2]) - 20) < 5, info  # at quarter resolution
    assert info["refined"] == 0 and info["taken"] == "the start", info


def test_outputs_are_checked_before_any_work_and_never_overwrite_an_input(bad_inputs, capsys, tmp_path):
    folder, head = bad_inputs
    script = load_register_script()
    a_file = tmp_path / "taken"
    a_file.write_text("a file where the output folder should go")
    inside = tmp_path / "out"
    inside.mkdir()
    own = inside / "warped.nii.gz"  # an input where an output of the same name will go
    sitk.WriteImage(sitk.ReadImage(str(head)), str(own))
    for argv, expected in (
            (["--fixed", str(head), "--moving", str(head), "--output-dir", str(a_file)], "taken: is a file"),
            (["--fixed", str(head), "--moving", str(own), "--output-dir", str(inside)],
             "warped.nii.gz: is also an input")):
        assert script.main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert a_file.read_text().startswith("a file") and own.is_file()


def test_ctrl_c_says_that_nothing_was_written(bad_inputs, capsys, tmp_path, monkeypatch):
    import gvsl.registration

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gvsl.registration, "register_prepared", interrupted)
    folder, head = bad_inputs
    code = load_register_script().main(["--fixed", str(head), "--moving", str(head), "--output-dir",
                                        str(tmp_path / "out"), "--no-progress"])
    assert code == 130 and "interrupted: nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_metrics_json_holds_null_where_a_figure_is_missing():
    from gvsl.registration_io import finite

    metrics = {"ncc_after": float("nan"), "dice_after": {"gm": float("inf"), "wm": 0.9}, "tre": [1.0, float("nan")]}
    text = json.dumps(finite(metrics), allow_nan=False)
    assert json.loads(text) == {"ncc_after": None, "dice_after": {"gm": None, "wm": 0.9}, "tre": [1.0, None]}
    missing = []
    finite(metrics, missing)
    assert missing == ["ncc_after", "dice_after.gm", "tre[1]"]  # what the summary names as missing


def test_tiny_or_degenerate_images_are_refused_naming_the_files(tmp_path, capsys):
    head = synthetic.mni("t1")
    tiny = sitk.Image([5, 5, 5], sitk.sitkFloat32) + 1.0
    tiny[2, 2, 2] = 5.0
    sitk.WriteImage(tiny, str(tmp_path / "tiny.nii.gz"))
    coarse = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    coarse.SetSpacing((1000.0, 1000.0, 1000.0))
    coarse[10, 10, 10] = 5.0
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    sitk.WriteImage(head, str(tmp_path / "head.nii.gz"))
    script = load_register_script()
    for fixed, moving, expected in (("tiny", "head", "the fixed image is too small to register: (5, 5, 5) voxels"),
                                    ("head", "tiny", "the moving image is too small to register"),
                                    ("coarse", "head", "the moving image is too small to register: (197, 233, 189) "
                                     "voxels of (1.0, 1.0, 1.0) mm ((197.0, 233.0, 189.0) mm); at least 8 voxels per "
                                     "axis are needed, also on the 1000 mm working grid"),
                                    ("head", "coarse", "voxels ((1000.0, 1000.0, 1000.0) mm) are too coarse")):
        code = script.main(["--fixed", str(tmp_path / f"{fixed}.nii.gz"), "--moving", str(tmp_path / f"{moving}.nii.gz"),
                            "--output-dir", str(tmp_path / "out"), "--no-progress", "--mode", "rigid"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and f"moving: {tmp_path / (moving + '.nii.gz')}" in err, (fixed, moving, code, err)
    assert not (tmp_path / "out").exists()


def test_a_second_run_replaces_the_whole_set_of_outputs(tmp_path):
    """An earlier deformable run's field and warped labels do not stay beside a later rigid result."""
    from gvsl.registration_io import FILES

    fixed, moving, _, _, _ = synthetic.rigid_case(seed=1)
    labels = sitk.Cast(moving > float(np.percentile(sitk.GetArrayViewFromImage(moving), 70)), sitk.sitkUInt8)
    for name, image in (("f", fixed), ("m", moving), ("l", labels)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    common = ["--fixed", tmp_path / "f.nii.gz", "--moving", tmp_path / "m.nii.gz", "--output-dir", tmp_path / "out"]
    assert run_cli(*common, "--moving-labels", tmp_path / "l.nii.gz", "--iterations", 10).returncode == 0
    assert (tmp_path / "out" / FILES["displacement"]).is_file() and (tmp_path / "out" / FILES["warped_labels"]).is_file()
    assert run_cli(*common, "--mode", "rigid", "--iterations", 10).returncode == 0
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert FILES["displacement"] not in left and FILES["warped_labels"] not in left and FILES["transform"] in left


def test_a_thin_slice_fixed_image_keeps_the_outputs_small_and_exact(tmp_path):
    """0.4 x 0.4 x 6 mm: the field stays on the working grid, so the files stay within a small multiple
    of the fixed image, and transform.h5 still reproduces warped.nii.gz under SimpleITK."""
    t1 = synthetic.mni("t1")
    centre = np.array(t1.TransformContinuousIndexToPhysicalPoint(((np.array(t1.GetSize()) - 1) / 2).tolist()))
    size, spacing = [300, 360, 20], [0.4, 0.4, 6.0]
    direction = np.array(t1.GetDirection()).reshape(3, 3)
    origin = centre - direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    fixed = sitk.Resample(t1, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing, t1.GetDirection(), 0.0,
                          sitk.sitkFloat32)
    sitk.WriteImage(fixed, str(tmp_path / "thin.nii.gz"))
    sitk.WriteImage(t1, str(tmp_path / "t1.nii.gz"))
    done = run_cli("--fixed", tmp_path / "thin.nii.gz", "--moving", tmp_path / "t1.nii.gz", "--output-dir",
                   tmp_path / "out", "--iterations", 10)
    assert done.returncode == 0, done.stderr
    total = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert total < 4 * int(np.prod(size)) * 4  # under four float32 copies of the fixed image
    warped = sitk.ReadImage(str(tmp_path / "out" / "warped.nii.gz"))
    again = sitk.Resample(t1, fixed, sitk.ReadTransform(str(tmp_path / "out" / "transform.h5")), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(warped)).max() < 1e-3 * float(
        sitk.GetArrayFromImage(warped).max())


def test_a_label_map_on_another_grid_of_the_same_region_is_used(bad_inputs):
    from gvsl.registration.inputs import read_labels_for

    folder, head = bad_inputs
    image = sitk.ReadImage(str(head))
    labels = read_labels_for(folder / "finer.nrrd", image, head)  # as register.py --fixed-labels finer.nrrd
    assert labels.GetSize() == tuple(2 * s for s in image.GetSize())


def test_help_and_option_errors_answer_without_importing_torch():
    """torch's import takes seconds: --help and a mistyped option must not wait for it."""
    probe = ("import runpy, sys\nsys.argv = [sys.argv[1], *sys.argv[2:]]\ntry:\n    runpy.run_path(sys.argv[0], "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    for argv in (["--help"], ["--mode", "elastic"], ["--iterations", "0"]):
        done = subprocess.run([sys.executable, "-c", probe, str(SCRIPT), *argv], capture_output=True, text=True)
        assert "torch imported: False" in done.stdout, (argv, done.stdout, done.stderr)


def test_inputs_are_read_and_prepared_without_torch(bad_inputs):
    """register.py reads and prepares the pair in a thread while torch loads: that work must not need
    torch, and the pipeline (which does) must not come with the package."""
    folder, head = bad_inputs
    code = ("import sys, argparse; sys.modules['torch'] = None\n"
            "from gvsl.registration import RegistrationOptions, prepare\n"
            "from gvsl.registration.inputs import read_inputs\n"
            "args = argparse.Namespace(fixed=sys.argv[1], moving=sys.argv[1], fixed_labels=None, moving_labels=None,"
            " fixed_mask=None, moving_mask=None, initial_transform=None, fixed_landmarks=None)\n"
            "inputs = read_inputs(args)\n"
            "p = prepare(inputs['fixed'], inputs['moving'], RegistrationOptions(spacing=4.0))\n"
            "print(p.grid.GetSpacing(), p.presets, p.centring)\n"
            "try:\n    from gvsl.registration import register\nexcept ImportError:\n    print('no pipeline')")
    done = subprocess.run([sys.executable, "-c", code, str(head)], capture_output=True, text=True,
                          cwd=SCRIPT.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(4.0, 4.0, 4.0) ('mr', 'mr') moments" in done.stdout and "no pipeline" in done.stdout, done.stdout


def test_masks_of_any_non_zero_value_are_used(bad_inputs, capsys):
    """Non-zero means use, whatever the value: a probability map's 0.7, or -1."""
    folder, head = bad_inputs
    out = folder / "masked"
    code = load_register_script().main(["--fixed", str(head), "--moving", str(head), "--mode", "rigid",
                                        "--iterations", "10", "--fixed-mask", str(folder / "soft_mask.nii.gz"),
                                        "--moving-mask", str(folder / "negative_mask.nii.gz"), "--output-dir",
                                        str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["masks"] == {"fixed": "given", "moving": "given"}
