"""apply_transform.py: a registration's transforms applied to other data, each kind in the right
direction, checked point by point against SimpleITK applying the files itself."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import synthetic

ROOT = Path(__file__).resolve().parents[1] / "GVSLTrainer"
SCRIPT = ROOT / "apply_transform.py"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A deformable registration (so transform.h5 holds a field) of a moved MNI head at 4 mm."""
    folder = tmp_path_factory.mktemp("apply")
    fixed = synthetic.mni_at(4.0)
    centre = fixed.TransformContinuousIndexToPhysicalPoint(((np.array(fixed.GetSize()) - 1) / 2).tolist())
    moving = synthetic.moved_in_space(fixed, sitk.Euler3DTransform(centre, 0.08, -0.05, 0.1, (4.0, -3.0, 2.0)))
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    labels = sitk.Cast(sitk.OtsuMultipleThresholds(moving, 2), sitk.sitkUInt8)
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    done = subprocess.run([sys.executable, str(ROOT / "register.py"), "--fixed", str(folder / "fixed.nii.gz"),
                           "--moving", str(folder / "moving.nii.gz"), "--output-dir", str(folder / "reg"),
                           "--iterations", "30", "--spacing", "4", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return folder


def apply(*args, ok=True):
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr
    return done


def test_an_image_is_resampled_as_the_registration_warped_it(registered, tmp_path):
    apply("--transform", registered / "reg", "--input", registered / "moving.nii.gz", "--reference",
          registered / "fixed.nii.gz", "--output", tmp_path / "out.nii.gz")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(registered / "reg" / "warped.nii.gz")))
    assert np.abs(ours - warped).max() < 1e-3 * np.abs(warped).max()
    transform = sitk.ReadTransform(str(registered / "reg" / "transform.h5"))  # SimpleITK with the file itself
    fixed = sitk.ReadImage(str(registered / "fixed.nii.gz"))
    theirs = sitk.Resample(sitk.ReadImage(str(registered / "moving.nii.gz")), fixed, transform, sitk.sitkLinear, 0.0)
    assert np.abs(ours - sitk.GetArrayFromImage(theirs)).max() < 1e-3 * np.abs(warped).max()


def test_a_label_map_keeps_its_values_and_nearest_neighbour_matches_simpleitk(registered, tmp_path):
    apply("--transform", registered / "reg" / "transform.h5", "--input", registered / "labels.nii.gz", "--reference",
          registered / "fixed.nii.gz", "--output", tmp_path / "nearest.nii.gz", "--interpolation", "nearest")
    done = apply("--transform", registered / "reg", "--input", registered / "labels.nii.gz", "--reference",
                 registered / "fixed.nii.gz", "--output", tmp_path / "label.nii.gz")
    assert "(label map)" in done.stdout
    transform = sitk.ReadTransform(str(registered / "reg" / "transform.h5"))
    theirs = sitk.Resample(sitk.ReadImage(str(registered / "labels.nii.gz")), sitk.ReadImage(str(registered / "fixed.nii.gz")),
                           transform, sitk.sitkNearestNeighbor, 0)
    nearest, label = (sitk.ReadImage(str(tmp_path / n)) for n in ("nearest.nii.gz", "label.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(nearest), sitk.GetArrayFromImage(theirs))
    assert label.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2}
    assert (sitk.GetArrayFromImage(label) == sitk.GetArrayFromImage(theirs)).mean() > 0.9  # boundaries differ


def test_points_go_from_moving_to_fixed_through_the_inverse(registered, tmp_path):
    """Points on the moving image come out where the fixed image shows them: mapped back by
    transform.h5 (fixed -> moving) they land on the originals. Written in RAS, read in LPS."""
    moving = sitk.ReadImage(str(registered / "moving.nii.gz"))
    centre = np.array(moving.TransformContinuousIndexToPhysicalPoint(((np.array(moving.GetSize()) - 1) / 2).tolist()))
    points = centre + np.random.default_rng(3).uniform(-30, 30, (5, 3))
    ras = points * [-1, -1, 1]
    (tmp_path / "in.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
                                      "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" +
                                      "".join(f"{i},{x},{y},{z},0,0,0,1,1,1,0,P{i},,\n" for i, (x, y, z) in enumerate(ras)))
    apply("--transform", registered / "reg", "--input", tmp_path / "in.fcsv", "--output", tmp_path / "out.mrk.json")
    doc = json.loads((tmp_path / "out.mrk.json").read_text())
    (markup,) = doc["markups"]
    assert markup["coordinateSystem"] == "LPS" and [p["label"] for p in markup["controlPoints"]] == [f"P{i}" for i in range(5)]
    moved = np.array([p["position"] for p in markup["controlPoints"]])
    forward = sitk.ReadTransform(str(registered / "reg" / "transform.h5"))
    back = np.array([forward.TransformPoint(p.tolist()) for p in moved])
    assert np.linalg.norm(back - points, axis=1).max() < 0.3  # the inverse field's accuracy
    assert np.linalg.norm(moved - points, axis=1).mean() > 3  # they did move (the pair is 5 mm apart)
    apply("--transform", registered / "reg", "--input", tmp_path / "out.mrk.json", "--output", tmp_path / "back.csv",
          "--invert")  # and back onto the moving image
    rows = [r.split(",") for r in (tmp_path / "back.csv").read_text().splitlines()[2:]]
    assert np.abs(np.array([[float(v) for v in r[1:]] for r in rows]) - points).max() < 0.3


def test_a_lone_displacement_field_cannot_move_points_and_says_why(registered, tmp_path):
    shutil.copy(registered / "reg" / "transform.h5", tmp_path / "field.h5")
    (tmp_path / "p.csv").write_text("x,y,z\n0,0,0\n")
    done = apply("--transform", tmp_path / "field.h5", "--input", tmp_path / "p.csv", "--output", tmp_path / "o.csv",
                 ok=False)
    assert done.returncode == 2 and "field.h5: points need the inverse of this displacement field" in done.stderr
    assert not (tmp_path / "o.csv").exists()
    done = apply("--transform", registered / "reg", "--input", registered / "moving.nii.gz", "--output",
                 tmp_path / "o.nii.gz", ok=False)
    assert "--reference is needed for an image" in done.stderr


def test_inverting_brings_fixed_data_onto_the_moving_grid(registered, tmp_path):
    apply("--transform", registered / "reg", "--invert", "--input", registered / "fixed.nii.gz", "--reference",
          registered / "moving.nii.gz", "--output", tmp_path / "f.nii.gz")
    inverse = sitk.ReadTransform(str(registered / "reg" / "inverse.h5"))
    theirs = sitk.Resample(sitk.ReadImage(str(registered / "fixed.nii.gz")), sitk.ReadImage(str(registered / "moving.nii.gz")),
                           inverse, sitk.sitkLinear, 0.0)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f.nii.gz")))
    assert np.abs(ours - sitk.GetArrayFromImage(theirs)).max() < 1e-3 * np.abs(ours).max()


def test_a_slicer_segmentation_keeps_its_segments(registered, tmp_path):
    labels = sitk.ReadImage(str(registered / "labels.nii.gz"))
    for i, (name, colour) in enumerate((("grey", "0.5 0.5 0.5"), ("white", "1 1 1"))):
        labels.SetMetaData(f"Segment{i}_Name", name)
        labels.SetMetaData(f"Segment{i}_Color", colour)
        labels.SetMetaData(f"Segment{i}_LabelValue", str(i + 1))
        labels.SetMetaData(f"Segment{i}_Extent", "0 3 0 3 0 3")
    sitk.WriteImage(labels, str(tmp_path / "in.seg.nrrd"), True)
    apply("--transform", registered / "reg", "--input", tmp_path / "in.seg.nrrd", "--reference",
          registered / "fixed.nii.gz", "--output", tmp_path / "out.seg.nrrd")
    out = sitk.ReadImage(str(tmp_path / "out.seg.nrrd"))
    assert out.GetMetaData("Segment1_Name") == "white" and out.GetMetaData("Segment0_Color") == "0.5 0.5 0.5"
    size = out.GetSize()
    assert out.GetMetaData("Segment0_Extent") == f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"


def test_the_gvsl_command_runs_each_tool():
    env_path = str(ROOT)
    for argv, expected in ((["apply", "--help"], "usage: gvsl apply"), (["register", "--help"], "usage: gvsl register"),
                           ([], "commands:"), (["--version"], "gvsl 0.1.0")):
        done = subprocess.run([sys.executable, "-m", "gvsl", *argv], capture_output=True, text=True, timeout=120,
                              cwd=env_path)
        assert expected in done.stdout, (argv, done.stderr)
    done = subprocess.run([sys.executable, "-m", "gvsl", "regster"], capture_output=True, text=True, cwd=env_path)
    assert done.returncode == 2 and "unknown command 'regster'" in done.stderr
    installed = Path(sys.executable).parent / ("gvsl.exe" if sys.platform == "win32" else "gvsl")  # [project.scripts]
    done = subprocess.run([str(installed), "segment", "--help"], capture_output=True, text=True, timeout=120)
    assert "usage: gvsl segment" in done.stdout and "--largest-component" in done.stdout
