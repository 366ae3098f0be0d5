"""Label fusion: locally weighted voting trusts each atlas where its image matches the target."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import synthetic
from gvsl.cohort.fusion import fuse


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in (1, 2)]))


@pytest.fixture(scope="module")
def target():
    image = synthetic.mni_at(4.0)
    labels = sitk.Resample(synthetic.tissue_labels(), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return image, labels


def moved(image: sitk.Image, labels: sitk.Image, shift_mm: float, where: str):
    """The image and its labels moved together by ``shift_mm`` along x: in one half (left or right,
    smoothly), or everywhere ('all'): an atlas registered well except there."""
    size = image.GetSize()
    x = np.linspace(0, 1, size[0])
    profile = {"left": 1 / (1 + np.exp((x - 0.45) * 30)), "right": 1 / (1 + np.exp(-(x - 0.55) * 30)),
               "all": np.ones_like(x)}[where]
    field = np.zeros((size[2], size[1], size[0], 3))
    field[..., 0] = shift_mm * profile[None, None, :]
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(image)
    transform = sitk.DisplacementFieldTransform(displacement)
    return (sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0),
            sitk.Resample(labels, image, transform, sitk.sitkNearestNeighbor, 0))


def test_weighted_voting_beats_majority_voting_when_atlases_are_misregistered_in_places(target):
    """Atlas A is off by 8 mm in the left half, B in the right half, C everywhere (a failed
    registration). Majority voting follows the two wrong atlases in each half; weighted voting
    follows the one whose image matches the target there."""
    image, labels = target
    atlases = [moved(image, labels, 8.0, where) for where in ("left", "right", "all")]
    truth = sitk.GetArrayFromImage(labels)
    results = {method: fuse(image, [a[0] for a in atlases], [a[1] for a in atlases], method)
               for method in ("majority", "weighted")}
    scores = {m: dice(sitk.GetArrayFromImage(r.labels), truth) for m, r in results.items()}
    singles = [dice(sitk.GetArrayFromImage(a[1]), truth) for a in atlases]
    assert scores["weighted"] > scores["majority"] + 0.1 and scores["weighted"] > max(singles) + 0.05, (scores, singles)
    fused = results["weighted"]
    assert fused.values == [0, 1, 2] and fused.labels.GetSize() == image.GetSize()
    assert fused.agreement[2] < min(fused.agreement[:2])  # the failed atlas agrees least with the result


def test_probabilities_are_vote_shares(target):
    image, labels = target
    atlases = [moved(image, labels, 4.0, where) for where in ("left", "right")]
    fused = fuse(image, [a[0] for a in atlases], [a[1] for a in atlases], "majority", probabilities=True)
    shares = np.stack([sitk.GetArrayFromImage(p) for p in fused.probabilities])
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, atol=1e-5)
    assert set(np.unique(shares)) <= {0.0, 0.5, 1.0}  # two atlases, equal weights


def test_label_fusion_segments_a_target_with_registered_atlases(target, tmp_path):
    """cohort.py label-fusion end to end: three atlases (the head moved by known rigid motions, its
    tissue labels with it; one a Slicer segmentation with segment names) registered onto the target
    on the cohort engine, fused, written with the names; a rerun reuses the registrations."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    image, labels = target
    sitk.WriteImage(image, str(tmp_path / "target.nii.gz"))
    centre = image.TransformContinuousIndexToPhysicalPoint(((np.array(image.GetSize()) - 1) / 2).tolist())
    rows = ["image,labels"]
    for i in range(3):
        motion = sitk.Euler3DTransform(centre, *np.radians([5.0 * (i - 1), 3.0, -2.0 * i]), (4.0 * (i - 1), 3.0, -2.0))
        atlas, atlas_labels = synthetic.moved_in_space(image, motion), synthetic.moved_in_space(labels, motion)
        label_file = f"a{i}_labels.seg.nrrd" if i == 0 else f"a{i}_labels.nii.gz"
        if i == 0:
            for k, (name, value) in enumerate((("grey matter", 1), ("white matter", 2))):
                atlas_labels.SetMetaData(f"Segment{k}_Name", name)
                atlas_labels.SetMetaData(f"Segment{k}_LabelValue", str(value))
        sitk.WriteImage(atlas, str(tmp_path / f"a{i}.nii.gz"))
        sitk.WriteImage(atlas_labels, str(tmp_path / label_file))
        rows.append(f"a{i}.nii.gz,{label_file}")
    (tmp_path / "atlases.csv").write_text("\n".join(rows) + "\n")
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "GVSLTrainer" / "cohort.py"), "label-fusion",
               "--target", str(tmp_path / "target.nii.gz"), "--atlases", str(tmp_path / "atlases.csv"), "--output",
               str(tmp_path / "fused.seg.nrrd"), "--no-progress", "--mode", "rigid", "--iterations", "30"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Fused 3 atlases (weighted voting)" in done.stdout and "grey matter, white matter" in done.stdout
    fused = sitk.ReadImage(str(tmp_path / "fused.seg.nrrd"))
    assert fused.GetMetaData("Segment1_Name") == "white matter" and fused.GetSize() == image.GetSize()
    assert dice(sitk.GetArrayFromImage(fused), sitk.GetArrayFromImage(labels)) > 0.8
    table = list(csv.DictReader((tmp_path / "fused.seg.nrrd.atlases.csv").open()))
    assert [r["atlas"] for r in table] == ["a0", "a1", "a2"] and all(float(r["agreement_dice"]) > 0.7 for r in table)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    statuses = [r["status"] for r in csv.DictReader((tmp_path / "fused.seg.nrrd.registrations" / "cohort.csv").open())]
    assert statuses == ["done earlier"] * 3

    segment = [sys.executable, str(Path(__file__).resolve().parents[1] / "GVSLTrainer" / "segment.py"), "--atlases",
               str(tmp_path / "atlases.csv"), "--input", str(tmp_path / "target.nii.gz"), "--output",
               str(tmp_path / "out" / "seg.nii.gz"), "--no-progress"]
    done = subprocess.run(segment, capture_output=True, text=True, timeout=600)  # no model: the atlases
    assert done.returncode == 0, done.stderr
    assert dice(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "seg.nii.gz"))),
                sitk.GetArrayFromImage(labels)) > 0.8
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.nii.gz", "seg.nii.gz.atlases.csv"]
